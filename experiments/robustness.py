"""The robust-aggregation table of docs/ROBUSTNESS.md: clean vs attacked runs, with and without norm clipping
and trimmed mean, for FedAvg and FedCMD.

    .venv/bin/python experiments/robustness.py runs/robustness [--seeds 1 2] [--rounds 30]

Every cell is one `fedcmd simulate` process (mnist5k, 10 devices made here with Dirichlet alpha 0.5, all 10
sampled every round, 2 of them attackers, 1 local epoch). It prints the markdown table (paper metric: mean test accuracy
before local training over the last 10 rounds; mean over seeds) and writes table.md beside the runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONDITIONS: list[tuple[str, list[str]]] = [
    ("clean, no defence", ["--clip-factor", "0"]),
    ("clean, clipping (default)", []),
    ("clean, trimmed mean + clipping", ["--aggregation", "trimmed_mean", "--trim-ratio", "0.2"]),
    ("scale 1e6, no defence", ["--attackers", "2", "--attack", "scale", "--clip-factor", "0"]),
    ("scale 1e6, clipping (default)", ["--attackers", "2", "--attack", "scale"]),
    ("scale 1e6, trimmed mean", ["--attackers", "2", "--attack", "scale", "--clip-factor", "0",
                                 "--aggregation", "trimmed_mean", "--trim-ratio", "0.2"]),
    ("scale 1e6, trimmed mean + clipping", ["--attackers", "2", "--attack", "scale",
                                            "--aggregation", "trimmed_mean", "--trim-ratio", "0.2"]),
    ("signflip 1e6, clipping (default)", ["--attackers", "2", "--attack", "signflip"]),
    ("signflip x1, clipping (default)", ["--attackers", "2", "--attack", "signflip", "--attack-scale", "1"]),
    ("noise 1e6, clipping (default)", ["--attackers", "2", "--attack", "noise"]),
    ("nan, clipping (default)", ["--attackers", "2", "--attack", "nan"]),
]
ALGOS = ["fedavg", "fedcmd"]
# --sweep: which clip factor to make the default (clean runs must not lose, attacked runs must hold)
SWEEP: list[tuple[str, list[str]]] = [
    (f"{name}, clip {factor}", [*extra, "--clip-factor", str(factor)])
    for factor in (1.0, 1.5)
    for name, extra in (("clean", []), ("scale 1e6", ["--attackers", "2", "--attack", "scale"]),
                        ("signflip 1e6", ["--attackers", "2", "--attack", "signflip"]))
]


def run_cell(out: Path, algo: str, seed: int, rounds: int, extra: list[str]) -> float | None:
    summary = out / "summary.json"
    if not summary.is_file():
        cmd = [
            str(Path(sys.executable).with_name("fedcmd")), "simulate", "--algo", algo, "-d", "mnist5k", "-cn", "10",
            "-a", "0.5", "-jr", "1.0", "-ge", str(rounds), "-le", "1", "--seed", str(seed), "--out", str(out),
            "--force", *extra,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
    value = json.loads(summary.read_text()).get("paper_metric")
    return float(value) if value is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="the clip-factor sweep instead of the table")
    args = parser.parse_args()
    rows = ["| condition | " + " | ".join(ALGOS) + " |", "|---|" + "---|" * len(ALGOS)]
    for name, extra in SWEEP if args.sweep else CONDITIONS:
        cells = []
        for algo in ALGOS:
            slug = name.replace(" ", "_").replace(",", "").replace("+", "and")
            values = [run_cell(args.out / algo / slug / f"s{seed}", algo, seed, args.rounds, extra)
                      for seed in args.seeds]
            got = [v for v in values if v is not None]
            cells.append(f"{sum(got) / len(got):.2f}" if got else "failed")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    (args.out / ("sweep.md" if args.sweep else "table.md")).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
