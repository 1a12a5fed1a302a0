"""The dashboard's view of a run, folded from the event stream: rounds, the open round, rejects by reason,
the device table, the strategy's vote and similarity. ``snapshot()`` is what the page receives (JSON); a
finished run folder gives the same shape (``from_run_folder``), so one page serves live and finished runs."""

from __future__ import annotations

import csv
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.monitor import events as ev

PAPER_WINDOW = 10  # rounds the paper metric averages (the window the page marks)
MAX_DEVICES_SHOWN = 500  # rows of the device table a snapshot carries (counts by state cover all)
MAX_ROUNDS_KEPT = 100_000  # a bound on memory for very long services
MAX_ROUNDS_SHOWN = 2_000  # rounds per run a snapshot carries (the newest): a snapshot stays ~0.5 MB at most
ROUND_FIELDS = ("test_before_acc", "test_after_acc", "test_before_loss", "test_after_loss", "all_test_before_acc")
MAX_RUN_FOLDER_BYTES = 64 * 2**20  # metrics.csv / summary.json larger than this are not read


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def round_row(record: Any) -> dict[str, Any]:
    """One round as the page shows it (round numbers 1-based, as metrics.csv)."""
    facts = getattr(record, "facts", {}) or {}
    row: dict[str, Any] = {
        "round": record.round + 1,
        "phase": record.phase,
        "sampled": len(record.clients),
        "answered": len(record.answered),
        "bytes_down": int(record.bytes_down),
        "bytes_up": int(record.bytes_up),
        "seconds": _num(record.seconds),
        "fit_seconds": _num(facts.get("fit_seconds_max")),
        "aggregate_seconds": _num(facts.get("aggregate_seconds")),
    }
    for key in ROUND_FIELDS:
        row[key] = _num(record.metrics.get(key))
    return row


@dataclass
class Device:
    state: str = "unknown"
    profile: str | None = None
    reason: str | None = None
    last_seen: float | None = None
    rounds: int = 0
    last_update_bytes: int | None = None
    rejects: int = 0


@dataclass
class RunView:
    """A named run's curves (one per finished run folder in ``fedcmd monitor``)."""

    name: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class DashboardState:
    """An event-stream subscriber. Thread-safe: the round loop writes, the web server reads snapshots."""

    wants_strategy_view = True  # RoundClosed events carry the vote and similarity view for it

    def __init__(self, title: str = "fedcmd", fleet_view: bool = True) -> None:
        self._lock = threading.Lock()
        self.version = 0
        self.title = title
        self.fleet_view = fleet_view  # show the device table
        self.status = "waiting"
        self.run: dict[str, Any] = {}
        self.runs: list[RunView] = [RunView(title)]
        self.current: dict[str, Any] | None = None
        self.rejected: Counter[str] = Counter()
        self.devices: dict[int, Device] = {}
        self.strategy: dict[str, Any] = {}
        self.final: dict[str, float] = {}

    # ----------------------------------------------------------------------------- the event stream
    def __call__(self, event: Any) -> None:
        with self._lock:
            self._apply(event)
            self.version += 1

    def _device(self, cid: int) -> Device:
        d = self.devices.get(cid)
        if d is None:
            d = self.devices[cid] = Device()
        return d

    def _apply(self, e: Any) -> None:
        now = time.time()
        if isinstance(e, ev.UpdateAccepted):
            if self.current is not None and e.round + 1 == self.current["round"]:
                self.current["answered"] += 1
            d = self._device(e.client)
            d.last_seen = now
            if e.kind == "fit":  # rounds taken part in; an evaluation is not one
                d.rounds += 1
                d.last_update_bytes = e.bytes
        elif isinstance(e, ev.UpdateRejected):
            self.rejected[e.reason] += 1
            if e.client is not None:
                self._device(e.client).rejects += 1
        elif isinstance(e, ev.Presence):
            d = self._device(e.client)
            d.state, d.reason, d.last_seen = e.state, e.reason, e.at
            if e.profile is not None:
                d.profile = e.profile
        elif isinstance(e, ev.RoundStarted):
            self.status = "running"
            self.current = {"round": e.round + 1, "phase": e.phase, "sampled": len(e.sampled), "answered": 0,
                            "deadline": e.deadline, "started_at": e.at, "min_clients": e.min_clients}
        elif isinstance(e, ev.RoundClosed):
            rounds = self.runs[0].rounds
            rounds.append(round_row(e.record))
            del rounds[:-MAX_ROUNDS_KEPT]
            self.strategy = dict(e.strategy)
            self.rejected = Counter(e.rejected)  # the coordinator's own counters are the truth
            if self.current is not None:
                self.current["closed"] = True
        elif isinstance(e, ev.RunStarted):
            self.status = "running"
            self.run = {"fleet": e.fleet, "algo": e.algo, "num_clients": e.num_clients,
                        "global_epoch": e.global_epoch, "join_ratio": e.join_ratio, "min_clients": e.min_clients,
                        "deadline": e.deadline}
            self.runs[0].rounds = [round_row(r) for r in e.history]
        elif isinstance(e, ev.RunFinished):
            self.status = "finished"
            self.final = {k: v for k, v in e.final.items() if _num(v) is not None}
            self.strategy.update({k: e.strategy[k] for k in ("chosen_layer", "vote_counts") if e.strategy.get(k)})
            self.current = None

    # ----------------------------------------------------------------------------- the page's view
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            states = Counter(d.state for d in self.devices.values())
            shown = sorted(self.devices.items())[:MAX_DEVICES_SHOWN]
            return {
                "version": self.version,
                "title": self.title,
                "status": self.status,
                "now": time.time(),
                "run": dict(self.run),
                "paper_window": PAPER_WINDOW,
                "runs": [{"name": r.name, "rounds": r.rounds[-MAX_ROUNDS_SHOWN:], "rounds_total": len(r.rounds),
                          "summary": r.summary} for r in self.runs],
                "current": dict(self.current) if self.current else None,
                "rejected": dict(self.rejected),
                "fleet_view": self.fleet_view,
                "device_states": dict(states),
                "devices": [{"client": c, "state": d.state, "profile": d.profile, "reason": d.reason,
                             "last_seen": d.last_seen, "rounds": d.rounds, "last_update_bytes": d.last_update_bytes,
                             "rejects": d.rejects} for c, d in shown],
                "devices_total": len(self.devices),
                "strategy": dict(self.strategy),
                "final": dict(self.final),
            }


class RunFolderError(ValueError):
    """A folder that is not a readable run folder; the text says which and why."""


def read_run_folder(folder: Path) -> RunView:
    """A finished run folder (metrics.csv + summary.json of any fedcmd run) as a named run's curves."""
    metrics, summ = folder / "metrics.csv", folder / "summary.json"
    if not metrics.is_file():
        raise RunFolderError(f"{folder} is not a run folder (no metrics.csv)")
    for path in (metrics, summ):
        if path.is_file() and path.stat().st_size > MAX_RUN_FOLDER_BYTES:
            raise RunFolderError(f"{path} is larger than {MAX_RUN_FOLDER_BYTES // 2**20} MiB")
    summary: dict[str, Any] = {}
    if summ.is_file():
        try:
            loaded = json.loads(summ.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{summ} is not valid JSON: {e}") from None
        summary = loaded if isinstance(loaded, dict) else {}
    rows: list[dict[str, Any]] = []
    try:
        with metrics.open(newline="") as f:
            for r in csv.DictReader(f):
                n = _num(r.get("round"))
                if n is None:
                    raise RunFolderError(f"{metrics}: a row without a round number")
                row: dict[str, Any] = {"round": int(n), "phase": r.get("phase", "")}
                for key in ("sampled", "answered"):
                    if r.get(key) is not None:
                        row[key] = len(str(r[key]).split())
                for key in (*ROUND_FIELDS, "bytes_down", "bytes_up", "seconds"):
                    row[key] = _num(r.get(key))
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as e:
        raise RunFolderError(f"{metrics} is not a readable CSV file: {e}") from None
    return RunView(str(folder), rows, {k: summary.get(k) for k in ("algo", "dataset", "paper_metric",
                                                                   "final_personalized_acc", "strategy")})


def from_run_folders(folders: list[Path]) -> DashboardState:
    """A dashboard of finished runs, their curves overlaid (``fedcmd monitor RUN_DIR...``)."""
    state = DashboardState(title=f"{len(folders)} finished run{'s' if len(folders) != 1 else ''}", fleet_view=False)
    state.runs = [read_run_folder(f) for f in folders]
    state.status = "finished"
    last = state.runs[-1].summary.get("strategy") or {}
    state.strategy = {k: last[k] for k in ("chosen_layer", "vote_counts") if isinstance(last, dict) and last.get(k)}
    return state
