"""Tests of glisk.embedded: the embedded PostgreSQL launcher."""
