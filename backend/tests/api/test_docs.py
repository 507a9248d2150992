"""/docs, /redoc and /openapi.json: a setting (API_DOCS), on in development and off by default
in production; when on, the pages load every script, style and icon from the API itself, never
from a third-party CDN."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tests.support.api import api_settings, create_logged_app, logging_restored

PAGES = ("/openapi.json", "/docs", "/redoc")
URL = "postgresql+psycopg://glisk:not-used-no-lifespan@127.0.0.1:1/glisk"


@asynccontextmanager
async def client_for(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app built with ``overrides``; no lifespan (no database): the
    documentation needs none."""
    with logging_restored():
        app, _ = create_logged_app(api_settings(URL, **overrides))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@pytest.mark.parametrize(
    ("app_env", "api_docs", "served"),
    [
        ("development", None, True),
        ("production", None, False),
        ("production", True, True),
        ("development", False, False),
    ],
)
async def test_the_documentation_is_a_setting_off_by_default_in_production(
    app_env: str, api_docs: bool | None, served: bool
) -> None:
    async with client_for(app_env=app_env, api_docs=api_docs) as client:
        for page in PAGES:
            response = await client.get(page)
            assert response.status_code == (200 if served else 404), page
        if served:
            assert "/health" in (await client.get("/openapi.json")).json()["paths"]


async def test_the_pages_load_every_script_style_and_icon_from_the_api_itself() -> None:
    async with client_for(app_env="production", api_docs=True) as client:
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assert "cdn" not in html.lower() and "fonts.googleapis" not in html, page
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
            assert assets, page
            for asset in assets:
                assert asset.startswith("/") and not asset.startswith("//"), (page, asset)
                response = await client.get(asset)
                assert response.status_code == 200 and response.content, (page, asset)
