"""The stage handlers a deployment runs, against the real services and the real chain:

    glisk worker image  --handler glisk.handlers.image:generate   # Replicate
    glisk worker upload --handler glisk.handlers.upload:upload    # Pinata
    glisk worker reveal --handler glisk.handlers.reveal:keeper    # the GLISK contract

Each is an object whose ``check()`` (or ``prepare()``) reads and validates the settings (``glisk
worker`` calls it before the first claim: a missing token or a node that is not the configured
chain stops the worker with one line and exit 2) and whose first call builds its clients and
database access from them; nothing is built at import. Each records every paid effect before
making it, in the claim's checkpoint (fenced by the lease) or the keeper's tables, and reconciles
it when a rescuer finds it there: see each module's docstring.
"""
