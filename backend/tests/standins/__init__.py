"""Tests of glisk.standins: the fake chain and the fake mint feed."""
