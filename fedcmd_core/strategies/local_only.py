"""Local-Only: every device trains its own model on its own data; nothing is ever communicated.
The lower bound every federated method must beat on shared structure."""

from __future__ import annotations

from fedcmd_core.strategies.base import Algorithm, ClientStrategy, HyperParams, ServerStrategy


class LocalOnlyServer(ServerStrategy):
    send_full_first = False

    def shared_keys(self, rnd: int) -> list[str]:
        return []


class LocalOnlyClient(ClientStrategy):
    """Device side: plain local training (the base class's)."""


ALGORITHM = Algorithm("local", HyperParams, LocalOnlyServer, LocalOnlyClient)
