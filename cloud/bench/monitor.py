"""``fedcmd bench monitor``: what watching a run costs. The same simulation (default: FedCMD on mnist5k, 20
clients, join ratio 0.2, 60 rounds) runs as its own process with and without ``--visible 1``, alternating,
with a viewer attached to the live stream (as a browser tab would be) for the watched runs; the result is
the ratio of median wall times (target: at most 1.05, issue 14)."""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

TARGET_RATIO = 1.05
URL = re.compile(r"dashboard: http://127\.0\.0\.1:(\d+)/")


def _viewer(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """Read the event stream like a page would, until the run ends."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/events")
        resp = conn.getresponse()
        while not stop.is_set():
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                counts["snapshots"] += 1
    except OSError:
        return


def _one(args: list[str], visible: bool, out: Path) -> dict[str, Any]:
    cmd = [str(Path(sys.executable).with_name("fedcmd")), "simulate", *args, "--quiet", "--out", str(out), "--force"]
    if visible:
        cmd += ["--visible", "1", "--visible-port", "0"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    counts = {"snapshots": 0}
    viewer = None
    err: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        err.append(line)
        m = URL.search(line)
        if m and viewer is None:
            viewer = threading.Thread(target=_viewer, args=(int(m.group(1)), stop, counts), daemon=True)
            viewer.start()
    proc.wait()
    wall = time.perf_counter() - started
    stop.set()
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed ({proc.returncode}): {''.join(err)[-2000:]}")
    if visible and viewer is None:
        raise RuntimeError("the watched run printed no dashboard URL")
    summary = json.loads((out / "summary.json").read_text())
    return {"visible": visible, "wall_s": wall, "run_s": summary["seconds"], "snapshots": counts["snapshots"],
            "paper_metric": summary["paper_metric"]}


def run_monitor_bench(pairs: int, args: list[str]) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedcmd-bench-monitor-") as tmp:
        for i in range(pairs):
            order = (False, True) if i % 2 == 0 else (True, False)  # alternate which goes first
            for visible in order:
                runs.append(_one(args, visible, Path(tmp) / f"{i}-{int(visible)}"))
    plain = [r["wall_s"] for r in runs if not r["visible"]]
    watched = [r["wall_s"] for r in runs if r["visible"]]
    ratio = statistics.median(watched) / statistics.median(plain)
    same = len({r["paper_metric"] for r in runs}) == 1  # watching must not change the run
    return {"args": args, "pairs": pairs, "runs": runs, "median_plain_s": statistics.median(plain),
            "median_watched_s": statistics.median(watched), "ratio": ratio, "target": TARGET_RATIO,
            "same_results": same, "loadavg": Path("/proc/loadavg").read_text().split()[:3]
            if Path("/proc/loadavg").is_file() else None}


def monitor(
    pairs: int = typer.Option(3, "--pairs", help="Runs with and without --visible 1, alternating."),
    rounds: int = typer.Option(60, "--rounds", help="Rounds of each run."),
    args: str = typer.Option("--algo fedcmd -d mnist5k -cn 20 -jr 0.2 --seed 1", "--args",
                             help="The simulate options of every run (rounds come from --rounds)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Wall time of a simulation with the live dashboard (and a viewer) over the same run without it."""
    result = run_monitor_bench(pairs, [*args.split(), "-ge", str(rounds)])
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(title=f"--visible 1 overhead ({pairs} pairs, {rounds} rounds each)")
    for col in ("run", "--visible", "wall s", "run s", "snapshots sent"):
        table.add_column(col, justify="right")
    for i, r in enumerate(result["runs"], 1):
        table.add_row(str(i), "1" if r["visible"] else "0", f"{r['wall_s']:.2f}", f"{r['run_s']:.2f}",
                      str(r["snapshots"]) if r["visible"] else "-")
    console.print(table)
    verdict = "within" if result["ratio"] <= TARGET_RATIO else "ABOVE"
    console.print(f"median wall time: {result['median_watched_s']:.2f} s watched / {result['median_plain_s']:.2f} s "
                  f"plain = [bold]{result['ratio']:.3f}[/bold] ({verdict} the {TARGET_RATIO} target); same results: "
                  f"{result['same_results']}; load average {' '.join(result['loadavg'] or [])}")
