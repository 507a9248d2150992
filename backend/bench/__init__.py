"""Benchmarks (scripts, not tests): ``uv run python -m bench NAME`` from backend/."""
