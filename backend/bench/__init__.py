"""Benchmarks (scripts, not tests). Run from backend/: ``uv run python -m bench.http_bench``."""
