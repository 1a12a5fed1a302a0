"""The tables ``fedcmd simulate`` prints, sized to the terminal: a round table too wide for it is printed
with short column names and a legend (and, narrower still, one round per line)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

# (full name, short name, legend)
ROUND_COLUMNS = (
    ("round", "r", "round"),
    ("phase", "ph", "phase"),
    ("acc before", "acc0", "accuracy (%) of the round's clients before local training"),
    ("acc after", "acc1", "accuracy (%) after local training"),
    ("loss", "loss0", "test loss before local training"),
    ("KiB down", "dn", "KiB sent to the devices"),
    ("KiB up", "up", "KiB sent back"),
    ("s", "s", "seconds of the round"),
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


def fits(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int, gap: int = 3) -> bool:
    """Whether a table of these cells fits ``width`` columns without cutting a cell (rich's padding + rule)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    return sum(widths) + gap * (len(widths) - 1) <= width


def adaptive_table(headers: Sequence[tuple[str, str, str]], rows: Sequence[Sequence[str]], width: int,
                   title: str | None = None, left: int = 1) -> RenderableType:
    """A table that fits ``width``: full headers, else short headers and a legend, else one block per row
    (``name: value`` lines). The first ``left`` columns are left-aligned, the rest right-aligned."""
    from rich.console import Group

    for pick in (0, 1):
        names = [h[pick] for h in headers]
        if fits(names, rows, width):
            table = Table(title=title, show_edge=False, pad_edge=False)
            for i, name in enumerate(names):
                table.add_column(name, justify="left" if i < left else "right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            if pick == 0:
                return table
            legend = Text("; ".join(f"{h[1]} = {h[2]}" for h in headers if h[1] != h[2]), style="dim")
            return Group(table, legend)
    lines: list[RenderableType] = [Text(title, style="bold")] if title else []
    for row in rows:
        lines.append(Text(" | ".join(f"{h[1]}: {v}" for h, v in zip(headers, row)), overflow="fold"))
    return Group(*lines)


def round_table(records: Sequence[Any], console: Console) -> RenderableType:
    return adaptive_table(ROUND_COLUMNS, [_cells(r) for r in records], console.width, left=0)


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
