"""What a reveal keeper needs to run: ``KeeperConfig``, which ``glisk.handlers.reveal`` builds from
the settings and every part of the keeper reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount


@dataclass(frozen=True)
class KeeperConfig:
    """What a keeper needs; ``glisk.handlers.reveal`` builds it from the settings."""

    rpc_url: str
    chain_id: int
    contract: str
    account: LocalAccount = field(repr=False)
    max_fee_per_gas: int  # the cap, wei
    confirmations: int = 1
    stuck_after: float = 90.0  # seconds before a transaction next in line is replaced
    poll: float = 1.0  # seconds between two looks at the chain
    wait: float = 120.0  # seconds one handler call waits for its confirmation
    rpc_timeout: float = 10.0

    @property
    def rebroadcast_every(self) -> float:
        """How often the same signed bytes go out again while nothing is mined."""
        return max(self.poll, self.stuck_after / 3)
