"""The anvil launcher: a real node on a free port, its dev accounts funded, gone with its parent."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from glisk.chain.anvil import Anvil, anvil_binary
from glisk.errors import AnvilError
from tests.support.processes import alive, wait_gone


def test_two_nodes_start_on_their_own_ports_and_stop_leaving_nothing() -> None:
    with Anvil() as first, Anvil(chain_id=8453) as second:
        assert first.port != second.port
        assert int(first.call("eth_chainId"), 16) == 31337
        assert int(second.call("eth_chainId"), 16) == 8453
        assert len(first.private_keys) == 10
        pid = first.pid
        assert pid is not None and alive(pid)
    assert not wait_gone({pid}, 5), "anvil outlived stop()"


def test_interval_mining_makes_blocks_without_transactions() -> None:
    with Anvil(block_time=0.2) as node:
        first = int(node.call("eth_blockNumber"), 16)
        deadline_blocks = first + 2
        for _ in range(100):
            if int(node.call("eth_blockNumber"), 16) >= deadline_blocks:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert int(node.call("eth_blockNumber"), 16) >= deadline_blocks


def test_an_error_answer_names_the_method() -> None:
    with Anvil() as node, pytest.raises(AnvilError, match="no_such_method"):
        node.call("no_such_method")


def test_a_sigkilled_parent_leaves_no_anvil_behind() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-m", "tests.support.anvil_proc"], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    line = parent.stdout.readline().split()
    assert line, "the parent never said its anvil was up"
    anvil_pid = int(line[0])
    assert alive(anvil_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert not wait_gone({anvil_pid}, 10), "anvil outlived its SIGKILLed parent"


def test_the_binary_comes_from_the_platform_package() -> None:
    binary = anvil_binary()
    assert binary.name == "anvil" and binary.parent.parent.name.startswith("anvil-")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert "1.7.1" in out.stdout
