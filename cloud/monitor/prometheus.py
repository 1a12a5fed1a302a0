"""Prometheus metrics of a coordinator, fed by its event stream and served at the dashboard's ``/metrics``.

Each sink has its own registry (two runs in one process never share counters). Names (``fleet`` label on
each): fedcmd_rounds_completed_total, fedcmd_round_duration_seconds (histogram), fedcmd_updates_accepted_total{kind},
fedcmd_updates_rejected_total{reason}, fedcmd_bytes_total{direction="up"|"down"}, fedcmd_devices{state},
fedcmd_paper_metric (mean test accuracy before training over the last 10 rounds, %), fedcmd_round (the
current round, 1-based), fedcmd_test_accuracy{when="before"|"after"} (the last closed round's)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

from cloud.monitor import events as ev
from cloud.monitor.state import PAPER_WINDOW

ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DEVICE_STATES = ("online", "offline", "unhealthy", "incompatible")


class PrometheusSink:
    def __init__(self, fleet: str = "sim") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.fleet = fleet
        r = self.registry
        self.rounds = Counter("fedcmd_rounds_completed", "Rounds closed by the coordinator", ["fleet"], registry=r)
        self.duration = Histogram("fedcmd_round_duration_seconds", "Wall time of a round", ["fleet"],
                                  buckets=ROUND_BUCKETS, registry=r)
        self.accepted = Counter("fedcmd_updates_accepted", "Device updates accepted (kind: fit or evaluate)",
                                ["fleet", "kind"], registry=r)
        self.rejected = Counter("fedcmd_updates_rejected", "Device messages rejected, by reason",
                                ["fleet", "reason"], registry=r)
        self.bytes = Counter("fedcmd_bytes", "Bytes of tasks (down) and accepted updates (up)",
                             ["fleet", "direction"], registry=r)
        self.devices = Gauge("fedcmd_devices", "Devices by their last presence state", ["fleet", "state"], registry=r)
        self.paper = Gauge("fedcmd_paper_metric", "Mean pooled test accuracy before local training over the last "
                           f"{PAPER_WINDOW} rounds (%)", ["fleet"], registry=r)
        self.round = Gauge("fedcmd_round", "The current round (1-based)", ["fleet"], registry=r)
        self.accuracy = Gauge("fedcmd_test_accuracy", "Pooled test accuracy of the last closed round (%)",
                              ["fleet", "when"], registry=r)
        self._lock = threading.Lock()
        self._states: dict[int, str] = {}
        self._window: deque[float] = deque(maxlen=PAPER_WINDOW)
        for state in DEVICE_STATES:
            self.devices.labels(fleet, state).set(0)

    def __call__(self, e: Any) -> None:
        f = self.fleet
        if isinstance(e, ev.UpdateAccepted):
            self.accepted.labels(f, e.kind).inc()
        elif isinstance(e, ev.UpdateRejected):
            self.rejected.labels(f, e.reason).inc()
        elif isinstance(e, ev.Presence):
            with self._lock:
                self._states[e.client] = e.state
                counts = Counter(self._states.values())
            for state in DEVICE_STATES:
                self.devices.labels(f, state).set(counts.get(state, 0))
        elif isinstance(e, ev.RoundStarted):
            self.round.labels(f).set(e.round + 1)
        elif isinstance(e, ev.RunStarted):
            self._window.clear()
            for r in e.history[-PAPER_WINDOW:]:
                if "test_before_acc" in r.metrics:
                    self._window.append(float(r.metrics["test_before_acc"]))
        elif isinstance(e, ev.RoundClosed):
            r = e.record
            self.rounds.labels(f).inc()
            self.duration.labels(f).observe(float(r.seconds))
            self.bytes.labels(f, "down").inc(int(r.bytes_down))
            self.bytes.labels(f, "up").inc(int(r.bytes_up))
            for when in ("before", "after"):
                value = r.metrics.get(f"test_{when}_acc")
                if value is not None:
                    self.accuracy.labels(f, when).set(float(value))
            if "test_before_acc" in r.metrics:
                self._window.append(float(r.metrics["test_before_acc"]))
                self.paper.labels(f).set(sum(self._window) / len(self._window))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
