"""Bytes per round of every algorithm at each update codec (fp32 = `none`, fp16, int8): the communication
table of docs/REPRODUCING.md (issue 11, part 4).

    .venv/bin/python experiments/communication.py runs/communication [--rounds 20]

Every cell is one `fedcmd simulate` process on the offline grid's mnist5k setting (50 clients made here with
Dirichlet alpha 0.1, 10 a round, LeNet-5), seed 1, one local epoch: bytes do not depend on how long a device
trains, only on what it is sent and sends back. Bytes are the framed MQTT payloads the coordinator counted
(`bytes_down` / `bytes_up` of metrics.csv: headers, names and tensors), averaged over the run's rounds. The
codec applies to the devices' updates only; tasks always travel as fp32. It prints the markdown table and
writes table.md beside the runs.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

ALGOS = ["local", "fedavg", "fedprox", "feddyn", "fedbn", "fedbabu", "fedper", "fedrep", "lgfedavg",
         "pfedsim", "fedap", "fedfomo", "fedcmd_noweight", "fedcmd"]
CODECS = ["none", "fp16", "int8"]
MIB = 2**20


def run_cell(out: Path, algo: str, codec: str, rounds: int) -> tuple[float, float] | None:
    """Mean bytes down / up per round of one run (None if it failed: the error is printed)."""
    metrics = out / "metrics.csv"
    if not metrics.is_file():
        cmd = [
            str(Path(sys.executable).with_name("fedcmd")), "simulate", "--algo", algo, "-d", "mnist5k",
            "-cn", "50", "-a", "0.1", "-ls", "20", "-jr", "0.2", "-ge", str(rounds), "-le", "1", "--seed", "1",
            "--update-codec", codec, "--out", str(out), "--force",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    down = sum(float(r["bytes_down"]) for r in rows) / len(rows)
    up = sum(float(r["bytes_up"]) for r in rows) / len(rows)
    return down, up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    cells = {(a, c): run_cell(args.out / a / c, a, c, args.rounds) for a in ALGOS for c in CODECS}
    base = cells[("fedavg", "none")]
    assert base is not None, "the FedAvg fp32 run failed: no baseline"
    base_total = base[0] + base[1]
    lines = [
        "| algorithm | down / round (MiB) | up fp32 | up fp16 | up int8 | total fp32 vs FedAvg "
        "| total int8 vs FedAvg |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in ALGOS:
        row = [cells[(a, c)] for c in CODECS]
        if any(r is None for r in row):
            lines.append(f"| {a} | failed | | | | | |")
            continue
        fp32, fp16, int8 = row  # type: ignore[misc]
        lines.append(
            f"| {a} | {fp32[0] / MIB:.3f} | {fp32[1] / MIB:.3f} | {fp16[1] / MIB:.3f} | {int8[1] / MIB:.3f} | "
            f"{(fp32[0] + fp32[1]) / base_total:.2f} | {(int8[0] + int8[1]) / base_total:.2f} |"
        )
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
