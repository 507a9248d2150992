"""Tests of glisk.embedded_pg: the embedded PostgreSQL launcher."""
