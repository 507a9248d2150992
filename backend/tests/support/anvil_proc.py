"""Entry point of a process that starts anvil and waits to be killed (the launcher's tests):
prints ``<anvil pid> <url>`` once the node answers."""

from __future__ import annotations

import sys
import time

from glisk.chain.anvil import Anvil


def main() -> None:
    node = Anvil().start()
    print(node.pid, node.url, flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main())
