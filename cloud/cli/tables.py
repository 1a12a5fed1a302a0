"""The tables ``fedcmd simulate`` prints; the round table fits the terminal (cloud/term_tables.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from cloud.term_tables import AdaptiveTable, Column

ROUND_COLUMNS = (
    Column("round", "r"),
    Column("phase", "ph"),
    Column("acc before", "acc0", "accuracy (%) of the round's clients before local training"),
    Column("acc after", "acc1", "accuracy (%) after local training"),
    Column("loss", "loss0", "test loss before local training"),
    Column("KiB down", "dn", "KiB sent to the devices"),
    Column("KiB up", "up", "KiB sent back"),
    Column("s", "s", "seconds of the round"),
)


def _cells(r: Any) -> list[str]:
    m = r.metrics
    return [
        str(r.round + 1),
        r.phase,
        f"{m.get('test_before_acc', float('nan')):.2f}",
        f"{m.get('test_after_acc', float('nan')):.2f}",
        f"{m.get('test_before_loss', float('nan')):.4f}",
        f"{r.bytes_down / 1024:.0f}",
        f"{r.bytes_up / 1024:.0f}",
        f"{r.seconds:.2f}",
    ]


def round_table(records: Sequence[Any]) -> AdaptiveTable:
    return AdaptiveTable(ROUND_COLUMNS, [_cells(r) for r in records], edge=False)


def summary_table(s: dict[str, Any], folder: Path) -> Table:
    table = Table(title=f"{s['algo']} on {s['dataset']} ({s['clients']} clients, {s['rounds']} rounds)")
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("paper metric: last-10-round mean of test_before (%)", f"{s['paper_metric']:.2f}")
    if s.get("final_personalized_acc") is not None:
        table.add_row("final personalized accuracy, all clients (%)", f"{s['final_personalized_acc']:.2f}")
    strat = s.get("strategy", {})
    if strat.get("chosen_layer"):
        table.add_row("chosen personal layer", str(strat["chosen_layer"]))
        table.add_row("layer votes", ", ".join(f"{k}:{v}" for k, v in strat.get("vote_counts", {}).items()))
    if s.get("attackers"):
        a = s["attackers"]
        table.add_row("attackers", f"{a['attack']} x{a['scale']:g}: devices {a['devices']}")
    if s.get("rejected_updates") or s.get("clipped_updates"):
        rejected = ", ".join(f"{k}:{v}" for k, v in sorted((s.get("rejected_updates") or {}).items()))
        table.add_row("rejected / clipped updates", f"{rejected or '-'} / {s.get('clipped_updates', 0)}")
    table.add_row("MiB down / up", f"{s['bytes_down'] / 2**20:.1f} / {s['bytes_up'] / 2**20:.1f}")
    table.add_row("seconds (per round)", f"{s['seconds']:.1f} ({s['seconds_per_round']:.3f})")
    table.add_row("run folder", str(folder))
    return table
