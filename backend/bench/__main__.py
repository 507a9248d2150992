"""``uv run python -m bench NAME [--flag VALUE ...]`` from backend/: one benchmark. What each
measures, and how, is in docs/benchmarks.md."""

import argparse
import importlib

# NAME: (module, its flags with their defaults)
COMMANDS = {
    "claim": ("runtime", {"seconds": 2.0, "workers": "1,4,8", "batches": "10", "tokens": 150_000}),
    "peer": ("runtime", {"jobs": 20_000, "processes": "1,4,8", "repeat": 3, "statements": False}),
    "wake": ("runtime", {"tokens": 100}),
    "scaleout": ("scaleout", {"tokens": 100_000, "processes": "32,64"}),
    "tables": ("tables", {"sizes": "10000,100000,1000000", "iterations": 300, "vacuum_every": 50}),
    "mint": ("runtime", {"seconds": 3.0}),
    "ingest": (
        "ingest",
        {
            "logs": 20_000,
            "batch": 500,
            "seconds": 5.0,
            "repeat": 3,
            "chain_logs": 3000,
            "per_block": 50,
            "small_range": 5,
        },
    ),
    "http": ("serving", {"seconds": 10}),
    "startup": ("serving", {"repeat": 3, "skip_suite": False, "imports_only": False}),
    "stages": (
        "stages",
        {
            "tokens": 1000,
            "concurrency": "16,64",
            "prediction_seconds": 30.0,
            "in_flight_concurrency": 64,
            "window": 20.0,
        },
    ),
    "reveal": ("chain", {"tokens": 1000, "batches": "50", "workers": "1,2", "block_time": 0.0}),
}

parser = argparse.ArgumentParser("python -m bench", description=__doc__)
names = parser.add_subparsers(dest="name", required=True)
for name, (_, flags) in COMMANDS.items():
    command = names.add_parser(name)
    for flag, default in flags.items():
        kind: dict = {"action": "store_true"} if default is False else {"type": type(default)}
        kind["help"] = f"default: {default}"
        command.add_argument("--" + flag.replace("_", "-"), default=default, **kind)
if __name__ == "__main__":
    args = parser.parse_args()
    getattr(importlib.import_module(f"bench.{COMMANDS[args.name][0]}"), args.name)(args)
