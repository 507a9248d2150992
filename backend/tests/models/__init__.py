"""Tests of glisk.models: the migrated schema, its constraints, the token state machine."""
