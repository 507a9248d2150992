"""The stage handlers a deployment runs, against the real services:

    glisk worker image  --handler glisk.handlers.image:generate   # Replicate
    glisk worker upload --handler glisk.handlers.upload:upload    # Pinata

Each is an object whose ``check()`` reads and validates the settings (``glisk worker`` calls it
before the first claim: a missing token stops the worker with one line and exit 2) and whose
first call builds its service client and database access from them; nothing is built at import.
Both record every paid effect before making it, in the claim's checkpoint (fenced by the lease),
and reconcile it when a rescuer finds it there: see each module's docstring.
"""
