"""Peak memory of FedCMD's cloud side with many devices, with and without a body-store budget (issue 12).

    .venv/bin/python experiments/body_store_rss.py [--clients 2000] [--per-round 100] [--budget-mb 50]

Each configuration runs in a fresh process: a FedCMD server (LeNet-5, 1 selection round) meets every
client once (``--per-round`` a round) with a synthetic update, as the coordinator would feed it; the process
reports its peak RSS (ru_maxrss) and the bytes the two body stores hold in memory and on disk. The
baseline row is the same server with no budget (every body in memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(clients: int, per_round: int, budget_mb: float, spill: str) -> dict[str, float]:
    import numpy as np

    from fedcmd_core.models import build_model
    from fedcmd_core.strategies import ModelSpec, ServerContext, Update, algorithm, parse_params
    from fedcmd_core.strategies.fedcmd import DELTA

    spec = ModelSpec.from_model(build_model("lenet5", (1, 28, 28), 10, seed=0))
    rounds = 1 + -(-clients // per_round)
    ctx = ServerContext(spec, clients, rounds, 0, body_budget_bytes=int(budget_mb * 2**20), spill_dir=Path(spill))
    server = algorithm("fedcmd")[0](parse_params("fedcmd", {"selection_rounds": 1}), ctx)
    rng = np.random.default_rng(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for rnd in range(rounds):
        cids = list(range(per_round)) if rnd == 0 else list(range((rnd - 1) * per_round, min(rnd * per_round, clients)))
        server.begin_round(rnd, cids)
        updates = {}
        for c in cids:
            task = server.task_for(rnd, c)
            arrays = {}
            for k in server.expected_upload(task):
                ref = spec.initial[k[len(DELTA):] if k.startswith(DELTA) else k]
                arrays[k] = (task.arrays.get(k, ref) + 0.01 * rng.standard_normal(ref.shape)).astype(ref.dtype)
            updates[c] = Update(rnd, arrays, 10, {}, {"votes": {"fc2": 1}})
        server.aggregate(rnd, updates)
    body_bytes = server.bodies[0].nbytes
    held = sum(s.memory_bytes for s in (server.bodies, server.sent))
    return {
        "budget_mb": budget_mb, "clients": clients, "body_kb": body_bytes / 1024,
        "bodies_stored": len(server.bodies) + len(server.sent),
        "all_bodies_mb": (len(server.bodies) + len(server.sent)) * body_bytes / 2**20,
        "in_memory_mb": held / 2**20, "spilled": server.bodies.spilled + server.sent.spilled,
        "rss_after_import_mb": base_rss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--budget-mb", type=float, default=50.0)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        clients, per_round, budget, spill = args.child
        print(json.dumps(child(int(clients), int(per_round), float(budget), spill)))
        return
    rows = []
    for budget in (0.0, args.budget_mb):
        with tempfile.TemporaryDirectory() as spill:
            cmd = [sys.executable, __file__, "--child", str(args.clients), str(args.per_round), str(budget), spill]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    base = rows[0]["peak_rss_mb"]
    print("| budget | bodies kept | all bodies (MB) | in memory (MB) | spilled | peak RSS (MB) | vs no budget |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        label = "none" if not r["budget_mb"] else f"{r['budget_mb']:g} MB"
        print(f"| {label} | {r['bodies_stored']} | {r['all_bodies_mb']:.0f} | {r['in_memory_mb']:.1f} | "
              f"{r['spilled']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.2f} |")
    print(f"(after imports and the model: {rows[0]['rss_after_import_mb']:.0f} MB; "
          f"one body {rows[0]['body_kb']:.0f} kB)")


if __name__ == "__main__":
    main()
