"""Tests of glisk.app and glisk.api: the HTTP shell, its database going away, generated requests,
the /health probe."""
