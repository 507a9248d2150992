"""Stage handlers users run with ``glisk worker STAGE --handler glisk.handlers.MODULE:NAME``.

Each is built from the settings on its first call (or by ``glisk worker`` before it starts, through
the handler's ``prepare()``), never at import.
"""
