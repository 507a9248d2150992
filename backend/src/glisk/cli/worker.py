"""``glisk worker STAGE --handler package.module:function``: one stage, run until SIGTERM.

Exit codes, for a supervisor (systemd ``RestartPreventExitStatus=2``, Kubernetes restart policy):
- 0: stopped by SIGTERM or SIGINT after draining (handlers in hand finished, results written);
- 1: the database could not be reached or is not migrated at start-up, the metrics port is in
  use, or the embedded PostgreSQL died and could not be restarted (worth restarting); or
  the worker stopped after giving up results it could not record (a database outage outlasted
  their leases, or the drain): ERROR lines ``worker.results_given_up`` name the tokens;
- 2: configuration or usage error: bad setting, unknown stage, a handler path that cannot be
  imported or is not an async function, a handler whose ``check()`` refuses the settings
  (restarting cannot help).
Settings come from WORKER_* variables; the command-line options override them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from glisk.cli.arguments import Subcommands, add_documented, port_number
from glisk.cli.database import Supervision, working_database
from glisk.errors import ConfigError, FieldValidationError, HandlerError, OperatorError, first_line
from glisk.pipeline import stage_names

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.workers.connection import ConnectOptions
    from glisk.workers.executor import Handler
    from glisk.workers.worker import Worker

NOOP = "noop"


def _bounded(
    kind: Callable[[str], float], low: float, high: float, *, above: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` (excluded when ``above``) to ``high``,
    the same range as the WORKER_* setting the option overrides."""

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = math.nan
        low_ok = number > low if above else number >= low
        if not (math.isfinite(number) and low_ok and number <= high):
            bound = f"more than {low:g}" if above else f"{low:g}"
            raise argparse.ArgumentTypeError(
                f"must be a number from {bound} to {high:g} (got {value!r})"
            )
        return number

    return parse


def add_parser(commands: Subcommands) -> None:
    worker = add_documented(
        commands,
        "worker",
        help="run one pipeline stage's handler over leased claims until SIGTERM",
        doc=__doc__,
    )
    worker.add_argument("stage", choices=stage_names())
    worker.add_argument(
        "--handler",
        dest="handler_path",  # args.handler is the CLI's dispatch function
        required=True,
        help="package.module:function, an async function; 'noop' for the built-in no-op handler",
    )
    worker.add_argument(
        "--concurrency",
        type=_bounded(int, 1, 10000),
        help="handlers at once (WORKER_CONCURRENCY)",
    )
    worker.add_argument(
        "--batch", type=_bounded(int, 1, 100), help="tokens per claim at most (WORKER_BATCH)"
    )
    worker.add_argument(
        "--lease",
        type=_bounded(float, 0, 86400, above=True),
        help="lease seconds (WORKER_LEASE_SECONDS)",
    )
    worker.add_argument(
        "--max-attempts", type=_bounded(int, 1, 100), help="claims per token and stage"
    )
    worker.add_argument(
        "--no-listen", action="store_true", help="poll only, no LISTEN (WORKER_LISTEN=false)"
    )
    worker.add_argument("--worker-id", help="holder name recorded on claims (default host:pid:rnd)")
    worker.add_argument(
        "--metrics-port", type=port_number, help="serve /metrics (WORKER_METRICS_PORT)"
    )
    worker.set_defaults(handler=cmd_worker)


def load_handler(path: str, stage: str) -> Handler:
    """The async function ``path`` names. Raises HandlerError with a one-line reason."""
    if path == NOOP:
        from glisk.pipeline import StageName
        from glisk.workers.noop import handlers

        return handlers()[StageName(stage)]
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerError(f"--handler {path!r}: must be package.module:function (or 'noop')")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported the same way
        raise HandlerError(
            f"--handler {path!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise HandlerError(f"--handler {path!r}: {module_name!r} has no attribute {part!r}")
        target = getattr(target, part)
    # An async def, or an object whose __call__ is one.
    call = target if inspect.isroutine(target) else type(target).__call__
    if not callable(target) or not inspect.iscoroutinefunction(call):
        raise HandlerError(f"--handler {path!r}: must be an async function (async def)")
    return cast("Handler", target)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    """Raises OperatorErrors: HandlerError or another ConfigError (exit 2), an unreachable or
    unmigrated database (exit 1)."""
    from glisk.workers.signals import hold_stop_signals

    hold_stop_signals()  # a stop before the worker is up is a clean stop too
    handler = load_handler(args.handler_path, args.stage)
    # A handler object may check its own settings first (glisk.handlers): a missing API token
    # stops the worker here, with one line and exit 2, rather than failing every token.
    check = getattr(handler, "check", None)
    if callable(check):
        check()
    # DATABASE_URL as it is; without it the embedded server, migrated, for this process's life
    # (or the one `glisk serve` of this checkout runs), restarted if it dies.
    supervision = Supervision()
    with working_database(settings, on_failure=supervision) as url:
        _serve(settings, args, handler, url)
    supervision.raise_if_failed()


def _serve(settings: Settings, args: argparse.Namespace, handler: Handler, url: str) -> None:
    from glisk.workers.connection import ConnectOptions
    from glisk.workers.worker import Worker

    options: dict[str, Any] = {**settings.worker_options()}
    overrides = {
        "concurrency": args.concurrency,
        "batch": args.batch,
        "lease_seconds": args.lease,
        "max_attempts": args.max_attempts,
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    if args.no_listen:
        options["listen"] = False
    timeout = options.pop("db_timeout")
    options.pop("prepare_statements")  # follows DB_POOLER, given to the connection options
    connect = ConnectOptions(url, timeout=timeout, pooler=settings.db_pooler)
    # A handler with prepare() (glisk.handlers.reveal) checks its settings and its service
    # before the worker claims anything: a ConfigError there exits 2, like any bad setting.
    prepare = getattr(handler, "prepare", None)
    port = args.metrics_port or settings.worker_metrics_port
    metrics = None
    if port is not None:  # glisk.workers.metrics: the handler timed, the stats read on scrape
        from glisk.workers.metrics import WorkerMetrics

        metrics = WorkerMetrics(args.stage)
        handler = metrics.wrap(handler)
    try:
        worker = Worker(args.stage, handler, connect, holder=args.worker_id, **options)
    except FieldValidationError as exc:  # an option out of range: a configuration error
        raise ConfigError(str(exc)) from None
    if metrics is not None and port is not None:
        metrics.attach(worker)
        try:
            metrics.serve(port)
        except OSError as exc:
            raise OperatorError(
                f"--metrics-port {port}: cannot listen on it: {exc.strerror or exc}"
            ) from None
    prepared = prepare if callable(prepare) else None
    asyncio.run(_run(worker, connect, cast("Callable[[], Awaitable[object]] | None", prepared)))


async def _run(
    worker: Worker,
    connect: ConnectOptions,
    prepare: Callable[[], Awaitable[object]] | None = None,
) -> None:
    import structlog

    from glisk.workers.connection import DATABASE_ERRORS
    from glisk.workers.queries import MIGRATED
    from glisk.workers.signals import install_stop_signals

    try:
        conn = await connect.connect()
        try:
            found = await (await conn.execute(MIGRATED.encode())).fetchone()
        finally:
            await conn.close()
    except DATABASE_ERRORS as exc:
        raise OperatorError(f"database unreachable: {first_line(exc)}") from None
    if found is None:
        raise OperatorError("the database is not migrated for this worker: run 'glisk db upgrade'")
    if prepare is not None:
        await prepare()
    stop = asyncio.Event()
    install_stop_signals(stop)
    log = structlog.get_logger("glisk.worker")
    log.info(
        "worker.start",
        stage=worker.stage.name,
        worker=worker.holder,
        concurrency=worker.concurrency,
        batch=worker.batch,
        listen=worker.listen,
    )
    stats = await worker.run(stop)
    log.info("worker.stop", worker=worker.holder, **vars(stats))
    if stats.given_up:
        raise OperatorError(
            f"{stats.given_up} finished result(s) were given up, never recorded: see the "
            "worker.results_given_up lines for the tokens and why"
        )
