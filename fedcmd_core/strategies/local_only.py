"""Local-Only: every device trains its own model on its own data; nothing is ever communicated.
The lower bound every federated method must beat on shared structure."""

from __future__ import annotations

from fedcmd_core.strategies.base import ClientStrategy, HyperParams, ServerStrategy


class LocalOnlyServer(ServerStrategy):
    name = "local"
    Params = HyperParams
    send_full_first = False

    def shared_keys(self, rnd: int) -> list[str]:
        return []


class LocalOnlyClient(ClientStrategy):
    name = "local"
    Params = HyperParams
