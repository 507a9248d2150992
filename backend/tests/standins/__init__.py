"""Tests of glisk.standins: the fake mint feed."""
