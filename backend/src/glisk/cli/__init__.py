"""The ``glisk`` command: ``serve``, ``worker``, ``ingest``, ``status``, ``tokens``, ``demo`` and
``db ...`` (``glisk.cli:main``, also ``python -m glisk.cli``).

Without DATABASE_URL they start the embedded PostgreSQL (data kept between runs) and stop it on
exit; a command other than ``serve`` uses the embedded server another glisk command of the same
data directory already runs.

The layout: ``commands`` (the parser and ``main``), ``database`` (which database, migrating it,
the embedded server's life: what every command shares), ``arguments`` (what the parsers share),
and one module per command group: ``serve``, ``worker``, ``ingest``, ``ops`` (status, tokens),
``demo``, ``db``. Imports run one way: ``commands`` imports the command modules, they import
``database`` and ``arguments``, and all of them import the packages that do the work
(``glisk.workers``, ``glisk.ingest``, ``glisk.ops``, ``glisk.migrations``), never the reverse.
"""

from glisk.cli.commands import main
from glisk.cli.db import EXIT_NEAR_LIMIT
from glisk.errors import EXIT_CONFIG
from glisk.errors import EXIT_FAILURE as EXIT_DATABASE

__all__ = ["EXIT_CONFIG", "EXIT_DATABASE", "EXIT_NEAR_LIMIT", "main"]
