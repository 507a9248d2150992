"""The embedded PostgreSQL launcher's former home, kept so that ``from glisk.embedded_pg import
...`` keeps working: every public name of ``glisk.embedded`` (where everything now lives), and
EmbeddedPostgresError, which it used to import."""

from glisk import embedded
from glisk.embedded import *  # noqa: F403 - exactly glisk.embedded.__all__
from glisk.errors import EmbeddedPostgresError

__all__ = ["EmbeddedPostgresError"]
__all__ += embedded.__all__
