"""Tests of glisk.workers: leased claims, the worker runtime, checkpoints, `glisk worker`, worker
processes killed at random."""
