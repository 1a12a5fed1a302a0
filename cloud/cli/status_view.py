"""How `fedcmd cloud status` shows the coordinator's retained status: a table (live with --watch) or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.table import Table

MAX_SHOWN = 12  # entries of a mapping (profiles, reject reasons) shown in one cell


def _mapping(value: Any) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    items = sorted(value.items(), key=lambda kv: (-kv[1], str(kv[0])) if isinstance(kv[1], (int, float)) else (0, ""))
    shown = ", ".join(f"{k}: {v}" for k, v in items[:MAX_SHOWN])
    return shown + (f", … {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def status_table(doc: dict[str, Any], fleet: str, received: float | None = None) -> Table:
    """The retained status as rows a person reads (no Python reprs)."""
    title = f"fleet {fleet}"
    if received is not None:
        title += f" (status of {time.strftime('%H:%M:%S', time.localtime(received))})"
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    run = doc.get("run") if isinstance(doc.get("run"), dict) else {}
    hp = run.get("hp") if isinstance(run.get("hp"), dict) else {}
    table.add_row("state", str(doc.get("state", "-")))
    table.add_row("algorithm", f"{run.get('algo', '-')}" + (f" ({_mapping(hp)})" if hp else ""))
    table.add_row("round", f"{doc.get('next_round', '-')} of {doc.get('global_epoch', '-')} done")
    table.add_row("devices online", str(doc.get("online", "-")))
    table.add_row("unhealthy / incompatible", f"{doc.get('unhealthy', 0)} / {doc.get('incompatible', 0)}")
    table.add_row("profiles online", _mapping(doc.get("profiles")))
    table.add_row("rejected messages", _mapping(doc.get("rejected")))
    table.add_row("clipped updates", str(doc.get("clipped", 0)))
    last = doc.get("last_round") if isinstance(doc.get("last_round"), dict) else None
    if last:
        metrics = last.get("metrics") if isinstance(last.get("metrics"), dict) else {}
        table.add_row("last round", f"{last.get('round', '-')} ({last.get('phase', '-')}): "
                      f"{last.get('answered', '-')} of {last.get('sampled', '-')} answered")
        table.add_row("last round accuracy", f"before {_num(metrics.get('test_before_acc'))} %, "
                      f"after {_num(metrics.get('test_after_acc'))} %")
    return table


def status_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, default=str)
