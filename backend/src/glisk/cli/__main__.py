"""``python -m glisk.cli``: the ``glisk`` command (tests and ``glisk demo`` start it this way)."""

import sys

from glisk.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
