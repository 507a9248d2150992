"""The embedded PostgreSQL as the settings describe it: where its data lives, how many connections
it takes, which database glisk uses on it, and the URL tools reach it by.

Nothing here starts a server: ``glisk.cli.database`` starts and stops it; the stage handlers
(``glisk.handlers.context``) and ``glisk db url`` only read where it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glisk.embedded import EmbeddedPostgres, default_data_dir

if TYPE_CHECKING:
    from glisk.core.config import Settings

# The database glisk creates and uses on the embedded server.
EMBEDDED_DATABASE = "glisk"


def embedded_server(settings: Settings, *, api_processes: int = 1) -> EmbeddedPostgres:
    """The embedded server of these settings (GLISK_PG_*), sized for ``api_processes`` API
    processes. Not started."""
    from glisk.core.config import project_dir

    return EmbeddedPostgres(
        data_dir=settings.glisk_pg_data or default_data_dir(project_dir()),
        port=settings.glisk_pg_port,
        max_connections=settings.embedded_max_connections(api_processes=api_processes),
        bindir=settings.glisk_pg_bindir,
        tcp=settings.glisk_pg_tcp,
    )


def url_for_tools(settings: Settings) -> str:
    """The libpq URL (password included) of the database glisk uses, for psql and other tools.
    Starts nothing: the embedded server's URL is read from its password file, and is valid
    whenever that server runs. Raises EmbeddedPostgresError if it was never started."""
    if settings.database_url is not None:
        from sqlalchemy.engine import make_url

        url = make_url(settings.database_url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)
    return embedded_server(settings).conninfo(EMBEDDED_DATABASE)
