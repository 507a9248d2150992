"""``/docs`` (Swagger UI) and ``/redoc`` served with their assets from this process.

FastAPI's own pages load Swagger UI and ReDoc from a third-party CDN (and ReDoc's fonts from
Google): every visit would tell that CDN who reads the API's documentation, and would run
whatever script it serves in the API's origin. Here the pages are FastAPI's documented
self-hosting recipe, with the assets shipped by the ``fastapi-offline`` package (Swagger UI's
bundle and CSS, ReDoc's standalone script) mounted under ``ASSETS``.

Whether the documentation is served at all is API_DOCS (``Settings.api_docs_enabled``): on in
development, off by default in production, where ``/openapi.json`` would map every route for
whoever asks.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

OPENAPI_URL = "/openapi.json"
ASSETS = "/docs-assets"


def assets_dir() -> Path:
    """The directory of the packaged Swagger UI and ReDoc assets."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets to ``app``, built with ``openapi_url`` set and
    ``docs_url``/``redoc_url`` None (FastAPI's CDN pages off)."""
    app.mount(ASSETS, StaticFiles(directory=assets_dir()), name="docs-assets")

    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
