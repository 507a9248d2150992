"""structlog configuration, applied by the app factory and the CLI (never at import)."""

import logging
import sys
from typing import Literal, TextIO

import structlog

AppEnv = Literal["development", "production"]


def configure_logging(
    app_env: AppEnv = "development", log_level: str = "INFO", *, stream: TextIO | None = None
) -> None:
    """Human-readable console lines in development, one JSON object per line in production,
    written to ``stream`` (standard error, as it is when called, by default).

    Standard-library loggers (uvicorn, alembic) are routed through the same renderer so an operator
    reads one format.
    """
    level = logging.getLevelNamesMapping()[log_level.upper()]
    out: TextIO = sys.stderr if stream is None else stream
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if app_env == "production":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        # Plain tracebacks: the default rich formatter shows local variables, which would print
        # connection parameters (passwords included) next to a failed connect.
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn's access log duplicates our request log line.
    logging.getLogger("uvicorn.access").disabled = True
    # Alembic announces each of its plugins at INFO when it is first imported, which the commands
    # now do on use, after this configuration: noise before every migration.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
