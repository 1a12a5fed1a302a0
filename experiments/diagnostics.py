"""Why the described FedCMD form collapses as alpha grows (issue 11, part 2): per-round mixing diagnostics.

Runs `fedcmd` in its described form (`variant=described`) and its default on offline cells (settings of
experiments/offline.toml) and records, per round, what the cloud's FedCMD server reports with each round:
staleness (mean age in rounds of the bodies mixed into a device's body, weighted; 1 = trained last round),
effective_bodies (1 / sum_j w_ij^2), similarity_std (spread of the s_ij used), body_drift (distance between
the mean bodies sent in consecutive rounds), next to the round's pooled test accuracy before training.

    nice -n 10 .venv/bin/python experiments/diagnostics.py OUT JOBS [FORM:DATASET:ALPHA ...]
    # default runs: described:mnist5k:0.1 described:mnist5k:1.0 default:mnist5k:1.0 (seed 1)
Writes OUT/diagnostics.csv and OUT/diagnostics.png.
"""

from __future__ import annotations

import csv
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FORMS = {"described": {"variant": "described"}, "default": {}}
KEYS = ("staleness", "effective_bodies", "similarity_std", "body_drift")


def run(args: tuple[str, float, str]) -> list[dict]:
    import torch

    from cloud.config import resolve
    from cloud.sim.simulate import build_and_run

    torch.set_num_threads(1)
    dataset, alpha, form = args
    values = {"algo": "fedcmd", "dataset": dataset, "alpha": alpha, "seed": 1, "client_num": 50,
              "join_ratio": 0.2, "global_epoch": 60, "local_epoch": 5, "least_samples": 20, "split": "sample",
              "fraction": 0.5, "local_lr": 0.01, "batch_size": 32, "test_gap": 0, "hp": FORMS[form]}
    res = build_and_run(resolve({}, values))
    rows = []
    for r in res.records:
        row = {"cell": f"{dataset} a{alpha}", "form": form, "round": r.round, "phase": r.phase,
               "test_before_acc": r.metrics.get("test_before_acc")}
        row.update({k: r.facts.get(k) for k in KEYS})
        rows.append(row)
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/diagnostics")
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    specs = sys.argv[3:] or ["described:mnist5k:0.1", "described:mnist5k:1.0", "default:mnist5k:1.0"]
    jobs = [(d, float(a), f) for f, d, a in (spec.split(":") for spec in specs)]
    cells = list(dict.fromkeys((d, a) for d, a, _ in jobs))
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        rows = [row for part in pool.map(run, jobs) for row in part]
    with open(out / "diagnostics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("test_before_acc", *KEYS)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, key in zip(axes, panels):
        for d, a in cells:
            for form, style in (("described", "--"), ("default", "-")):
                pts = [(r["round"], r[key]) for r in rows
                       if r["cell"] == f"{d} a{a}" and r["form"] == form and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{form}, {d} α {a}")
        ax.set_title(key)
        ax.set_xlabel("round")
        if key in ("effective_bodies", "body_drift"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=110)
    print(f"wrote {out / 'diagnostics.csv'} and {out / 'diagnostics.png'}")


if __name__ == "__main__":
    main()
