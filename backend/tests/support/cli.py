"""``glisk.cli.main`` run in the test's own process, as the CLI tests drive it (the subprocess
tests cover the real entry point)."""

from __future__ import annotations

import pytest
import structlog

from glisk.cli import main
from tests.support.processes import serve_env


def glisk_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, **env: str
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``glisk ARGV`` with ``serve_env(**env)`` as environment;
    DATABASE_URL and APP_ENV are unset unless given."""
    for name, value in serve_env(**env).items():
        monkeypatch.setenv(name, value)
    for name in ("DATABASE_URL", "APP_ENV"):
        if name not in env:
            monkeypatch.delenv(name, raising=False)
    # main() configures logging for the process; put back what the rest of the suite expects.
    saved = structlog.get_config()
    try:
        code = main(list(argv))
    finally:
        structlog.configure(**saved)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
