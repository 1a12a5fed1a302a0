"""mosquitto inside the broker namespace, listening on the bridge address the devices dial.

The broker of the tests everywhere else (``protocols.broker.MosquittoBroker``: ``max_queued_messages 0``,
``persistence false``, ``user root`` as root, the 1 MiB packet limit; DESIGN.md §6), started through
``ip netns exec`` on the bridge address. Its readiness check dials that address through the uplink.
"""

from __future__ import annotations

from pathlib import Path

from hil.netns import exec_argv, tied
from protocols.broker import MosquittoBroker


class NamespaceMosquitto(MosquittoBroker):
    """A :class:`protocols.broker.Broker` (``url``, ``stop()``, ``restart()``) run in namespace ``ns``."""

    def __init__(self, ns: str, host: str, workdir: Path, port: int = 1883) -> None:
        self.ns = ns
        workdir.mkdir(parents=True, exist_ok=True)
        # anonymous clients (the generated config's default): the namespace fleet is private; ACLs are
        # tested against the shipped config in test_deploy_artifacts.py
        super().__init__(port, workdir, host=host, launcher=lambda argv: tied(exec_argv(ns, argv)))
