"""anvil, Foundry's EVM node, started and stopped like the embedded PostgreSQL.

    with Anvil(block_time=None) as node:          # automine: a block per transaction
        w3 = client.connect(node.url)
        admin = node.account(0)                   # the dev accounts anvil funds (10,000 ETH)
        node.call("evm_setAutomine", [False])     # anvil's own RPC for faults

Contract:
- ``Anvil(...)`` does no I/O. ``start()`` finds the binary in the pinned npm packages
  (``glisk.npm``, installed on first use: no setting; one line naming what to install if Node.js
  or npm is missing), starts it on a free port of 127.0.0.1 chosen by anvil itself (``--port 0``,
  so two test runs never race for one), and returns once it answers JSON-RPC.
- The node is a child of the thread that called ``start()`` and dies with it
  (PR_SET_PDEATHSIG): a SIGKILLed parent leaves no anvil behind.
- ``stop()``: SIGTERM, wait, SIGKILL; the node's private directory (its log and the dev
  accounts' keys anvil writes there) is removed.
- The dev accounts' private keys are anvil's well-known test keys: never fund them on a real
  network.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from glisk.core import processes
from glisk.errors import AnvilError

_LISTENING = re.compile(r"Listening on 127\.0\.0\.1:(\d+)")
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_SYSTEMS = {"linux": "linux", "darwin": "darwin", "windows": "win32"}


def anvil_binary(node_modules: Path | None = None) -> Path:
    """anvil's binary from its platform package (``@foundry-rs/anvil-<os>-<arch>``), installing
    the pinned npm packages first if needed. Raises AnvilError (or NodeToolsError) in one line."""
    from glisk import npm

    system = _SYSTEMS.get(platform.system().lower())
    machine = _MACHINES.get(platform.machine().lower())
    if system is None or machine is None:
        raise AnvilError(
            f"anvil has no build for {platform.system()}/{platform.machine()} in @foundry-rs/anvil"
        )
    modules = node_modules or npm.node_modules()
    name = "anvil.exe" if system == "win32" else "anvil"
    binary = modules / "@foundry-rs" / f"anvil-{system}-{machine}" / "bin" / name
    if not binary.is_file():
        raise AnvilError(
            f"{binary} is missing: the npm package @foundry-rs/anvil-{system}-{machine} was not "
            "installed (remove the glisk npm cache directory to reinstall)"
        )
    return binary


@dataclass
class Anvil:
    """One anvil node on 127.0.0.1. ``block_time`` None mines a block per transaction
    (automine); a number mines every that many seconds. ``base_fee`` is the genesis base fee in
    wei (anvil's default: 1 gwei)."""

    block_time: float | None = None
    chain_id: int = 31337
    accounts: int = 10
    base_fee: int | None = None
    gas_limit: int | None = None
    extra_args: tuple[str, ...] = ()
    startup_timeout: float = 30.0
    port: int | None = field(default=None, init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _dir: Path | None = field(default=None, init=False, repr=False)
    _keys: list[str] = field(default_factory=list[str], init=False, repr=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("anvil is not running: call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def private_keys(self) -> list[str]:
        """The dev accounts' private keys (0x-hex), in anvil's order; each holds 10,000 ETH."""
        return list(self._keys)

    def start(self) -> Anvil:
        if self._process is not None:
            return self
        binary = anvil_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="glisk-anvil-"))
        log_path, config = self._dir / "anvil.log", self._dir / "accounts.json"
        args = [
            str(binary),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--chain-id",
            str(self.chain_id),
            "--accounts",
            str(self.accounts),
            "--config-out",
            str(config),
        ]
        if self.block_time is not None:
            args += ["--block-time", f"{self.block_time:g}"]
        if self.base_fee is not None:
            args += ["--block-base-fee-per-gas", str(self.base_fee)]
        if self.gas_limit is not None:
            args += ["--gas-limit", str(self.gas_limit)]
        args += list(self.extra_args)
        with open(log_path, "wb") as log:
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._dir,
                preexec_fn=processes.die_with_parent(),
            )
        try:
            self._wait_ready(log_path, config)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, log_path: Path, config: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise AnvilError(
                    f"anvil exited during start-up (code {self._process.returncode}): "
                    f"{self._log_tail(log_path)}"
                )
            if self.port is None:
                found = _LISTENING.search(log_path.read_text(errors="replace"))
                if found:
                    self.port = int(found.group(1))
            if self.port is not None and config.is_file():
                try:
                    self._keys = list(json.loads(config.read_text())["private_keys"])
                    if self.call("eth_chainId") is not None:
                        return
                except (ValueError, KeyError, OSError, AnvilError):
                    pass  # not written whole yet, or not answering yet
            time.sleep(0.02)
        raise AnvilError(
            f"anvil did not answer within {self.startup_timeout:.0f} s: {self._log_tail(log_path)}"
        )

    @staticmethod
    def _log_tail(log_path: Path) -> str:
        try:
            lines = log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def call(self, method: str, params: list[Any] | None = None, timeout: float = 10.0) -> Any:
        """One JSON-RPC call (anvil's test methods included); its result. Raises AnvilError on an
        error answer or when the node does not answer. Blocking: for tests and set-up."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
        request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 URL
            self.url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise AnvilError(f"anvil at {self.url} did not answer {method}: {exc}") from None
        if "error" in answer:
            raise AnvilError(f"{method}: {answer['error'].get('message', answer['error'])}")
        return answer.get("result")

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            processes.stop(process, timeout)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        self.port = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
