"""Planted mutants: break each fence that matters, one at a time, and check its tests notice.

The mutants are listed in ``scripts/mutants.toml``, each as (name, file, the exact text to find,
its replacement, the tests that must fail). For each one this script copies the text of ``file``
with ``find`` replaced, runs only those tests, and puts the file back. It works on a copy of
``src/`` and ``tests/`` in a temporary directory: the working tree is never modified, whatever
happens (a failure, Ctrl-C, a SIGKILL).

Exits 0 when every mutant was killed; 1 naming each mutant that survived (its tests passed) or
whose tests could not run; 2, before running anything, when a mutant no longer applies (its text
is not found exactly once: the code moved, update the mutant) or when the tests fail without any
mutant. Run it as ``bash scripts/mutants.sh`` from ``backend/`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BACKEND = Path(__file__).resolve().parent.parent
LIST = BACKEND / "scripts" / "mutants.toml"
COPIED = ("src", "tests", "pyproject.toml")
RUN_TIMEOUT = 300  # seconds for one pytest run; a hang counts as "could not run"
# `-m ""` lifts pyproject's marker filter: a mutant's tests may be end-to-end (slow) ones.
PYTEST = ("-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "--timeout", "60", "-m", "")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to backend/
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest node ids, relative to backend/


def load(path: Path = LIST) -> list[Mutant]:
    """The mutants in ``path``; SystemExit naming the entry for a malformed one."""
    with path.open("rb") as f:
        entries = tomllib.load(f).get("mutant", [])
    mutants: list[Mutant] = []
    for number, entry in enumerate(entries, 1):
        fields = {"name", "file", "find", "replace", "tests"}
        if set(entry) != fields or not isinstance(entry["tests"], list) or not entry["tests"]:
            raise SystemExit(
                f"{path.name}: mutant #{number} ({entry.get('name', '?')}) must have exactly "
                f"{sorted(fields)}, with a non-empty list of tests"
            )
        mutants.append(
            Mutant(
                entry["name"], entry["file"], entry["find"], entry["replace"], tuple(entry["tests"])
            )
        )
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path.name}: mutant names must be unique")
    return mutants


def problems(mutant: Mutant, root: Path) -> list[str]:
    """Why ``mutant`` cannot be applied to the tree at ``root`` (empty when it can)."""
    path = root / mutant.file
    if not path.is_file():
        return [f"{mutant.file} does not exist"]
    found = path.read_text().count(mutant.find)
    errors = []
    if found != 1:
        errors.append(f"its text is found {found} times in {mutant.file}, not exactly once")
    if mutant.find == mutant.replace:
        errors.append("its replacement is the text itself")
    for test in mutant.tests:
        if not (root / test.split("::")[0]).is_file():
            errors.append(f"no test file {test.split('::')[0]}")
    return errors


@contextlib.contextmanager
def mutated(root: Path, mutant: Mutant, serial: int) -> Iterator[None]:
    """``mutant`` applied to the copy at ``root`` while the block runs, then undone."""
    path = root / mutant.file
    original = path.read_text()
    stat = path.stat()
    path.write_text(original.replace(mutant.find, mutant.replace, 1))
    # A modification time of its own, so no cached bytecode of another version is reused.
    os.utime(path, (stat.st_atime, stat.st_mtime + 1000 * serial))
    try:
        yield
    finally:
        path.write_text(original)
        os.utime(path, (stat.st_atime, stat.st_mtime))


@dataclass(frozen=True)
class Outcome:
    code: int  # pytest's exit code; -1 when it timed out, -2 when stopped
    failed: list[str]  # "FAILED tests/...::test - reason" and "ERROR ..." lines
    tail: str
    seconds: float


STOPPING = threading.Event()  # Ctrl-C or SIGTERM: end the runs in flight, start no other


def pytest(root: Path, env: dict[str, str], tests: tuple[str, ...], processes: int = 0) -> Outcome:
    """Run ``tests`` in the copy at ``root`` (``processes``: pytest-xdist's -n), in a process
    group of its own, ended early (code -2) when STOPPING is set."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(
            [sys.executable, *PYTEST, "-n", str(processes), *tests],
            cwd=root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        code: int | None = None
        try:
            while code is None:
                try:
                    code = child.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    late = time.monotonic() - started > RUN_TIMEOUT
                    if STOPPING.is_set() or late:
                        end_group(child)
                        code = -2 if STOPPING.is_set() else -1
        except BaseException:  # stopped while this thread waited
            end_group(child)
            raise
        output.seek(0)
        text = output.read()
    failed = [line for line in text.splitlines() if re.match(r"(FAILED|ERROR) ", line)]
    return Outcome(code, failed, text[-3000:], time.monotonic() - started)


def end_group(child: subprocess.Popen[str]) -> None:
    """SIGTERM the run's process group (pytest and what it started), SIGKILL what lingers."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
            return


def copy_tree(root: Path) -> Path:
    """A copy of what the tests need (src/, tests/, pyproject.toml) at ``root``."""
    root.mkdir(parents=True)
    for name in COPIED:
        source = BACKEND / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    return root


def judge(mutant: Mutant, outcome: Outcome) -> tuple[str, str | None]:
    """What to print for ``mutant``'s run, and how to name it among the survivors (None: it
    was killed)."""
    # Killed: a test failed. An error in a fixture (setup, teardown) means no test ran to its end.
    killers = [line for line in outcome.failed if line.startswith("FAILED ")]
    if outcome.code == 1 and killers:
        return f"killed ({outcome.seconds:.0f} s): {killers[0]}", None
    if outcome.code == 0:
        return f"SURVIVED: its {len(mutant.tests)} test(s) passed", f"{mutant.name} (survived)"
    why = "timed out" if outcome.code < 0 else f"pytest exited {outcome.code}"
    return (
        f"COULD NOT RUN its tests ({why}):\n{outcome.tail}",
        f"{mutant.name} (its tests could not run: {why})",
    )


def environment(root: Path, cache: Path) -> dict[str, str]:
    """This interpreter's environment, importing glisk and the tests from the copy at ``root``
    (ahead of the editable install) and caching bytecode under ``cache``, outside the tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root / "src"), str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def check_copy_is_imported(root: Path, env: dict[str, str]) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import glisk; print(glisk.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).is_relative_to(root):
        raise SystemExit(f"the tests would import glisk from {where}, not from the copy {root}")


@contextlib.contextmanager
def database(envs: dict[Path, dict[str, str]]) -> Iterator[None]:
    """One embedded PostgreSQL for every run (each run makes its own throwaway database on it),
    unless GLISK_TEST_DATABASE_URL already names a server."""
    if os.environ.get("GLISK_TEST_DATABASE_URL"):
        yield
        return
    from glisk.testing import scratch_server

    with scratch_server(max_connections=400) as server:
        for env in envs.values():
            env["GLISK_TEST_DATABASE_URL"] = server.url
        yield


def stop(signum: int, frame: object) -> None:
    STOPPING.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mutants.sh", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests")
    parser.add_argument(
        "--check", action="store_true", help="only check that every mutant applies exactly once"
    )
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args(argv)

    mutants = load()
    broken = {m.name: errors for m in mutants if (errors := problems(m, BACKEND))}
    if broken:
        print(f"{len(broken)} mutant(s) in {LIST.name} no longer apply; update them:")
        for name, errors in broken.items():
            print(f"  {name}: " + "; ".join(errors))
        return 2
    if args.names:
        mutants = [m for m in mutants if any(n in m.name for n in args.names)]
        if not mutants:
            print("no mutant name contains " + ", ".join(args.names))
            return 2
    if args.list:
        for m in mutants:
            print(f"{m.name}\n  {m.file}\n" + "".join(f"  - {t}\n" for t in m.tests))
        return 0
    if args.check:
        print(f"all {len(mutants)} mutants apply exactly once")
        return 0

    # Ctrl-C and SIGTERM stop the runs and unwind: the copies and the database go on the way out.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    jobs = max(1, min(args.jobs, len(mutants)))
    with tempfile.TemporaryDirectory(prefix="glisk-mutants-") as scratch:
        # One copy per job: a mutant is applied to its own copy while another job runs.
        roots = [copy_tree(Path(scratch) / f"copy{job}") for job in range(jobs)]
        envs = {root: environment(root, Path(scratch) / "pycache") for root in roots}
        for root in roots:
            check_copy_is_imported(root, envs[root])
        with database(envs):
            every_test = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"{len(every_test)} tests, without any mutant ...", flush=True)
            # pytest-xdist pays a start-up per process: worth it for many tests only.
            processes = jobs if len(every_test) > 8 else 0
            baseline = pytest(roots[0], envs[roots[0]], every_test, processes=processes)
            if baseline.code != 0:
                print(baseline.tail)
                print("the tests fail without any mutant: fix them first")
                return 2
            print(f"  pass ({baseline.seconds:.0f} s)", flush=True)
            print(f"{len(mutants)} mutants, {jobs} at a time ...", flush=True)
            free: queue.Queue[Path] = queue.Queue()
            for root in roots:
                free.put(root)

            def attempt(serial: int, mutant: Mutant) -> str | None:
                if STOPPING.is_set():
                    return None
                root = free.get()
                try:
                    with mutated(root, mutant, serial):
                        outcome = pytest(root, envs[root], mutant.tests)
                finally:
                    free.put(root)
                if STOPPING.is_set():
                    return None
                verdict, survivor = judge(mutant, outcome)
                print(f"[{serial}/{len(mutants)}] {mutant.name}\n  {verdict}", flush=True)
                return survivor

            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                results = list(pool.map(attempt, range(1, len(mutants) + 1), mutants))
            finally:  # when stopped: end the runs in flight, start nothing more
                pool.shutdown(wait=True, cancel_futures=True)
            survivors = [survivor for survivor in results if survivor is not None]
    elapsed = time.monotonic() - started
    if survivors:
        print(f"\n{len(survivors)} of {len(mutants)} mutants not killed ({elapsed:.0f} s):")
        for survivor in survivors:
            print(f"  {survivor}")
        return 1
    print(f"\nall {len(mutants)} mutants killed ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("stopped; the working tree was not touched", file=sys.stderr)
        sys.exit(130)
