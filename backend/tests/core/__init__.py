"""Tests of glisk.core: configuration and settings, connections through a pooler."""
