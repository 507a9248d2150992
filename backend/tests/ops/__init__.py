"""Tests of glisk.ops: `glisk status`, `glisk tokens`, Prometheus metrics, `glisk demo`."""
