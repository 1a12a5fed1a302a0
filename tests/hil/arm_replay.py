"""Replay one task frame the way ``fedcmd-edge run`` answers it, on whatever machine runs this file.

The aarch64-vs-x86 comparison of tests/hil/test_arm.py: the task the coordinator sent the emulated Pi, with
the Pi's run description and its partition slice, answered again from a fresh state (the Pi's state before
its first task) by this machine's torch and kernels. Run with the Python of the environment to compare
(the repository's .venv here, /opt/fedcmd/bin/python inside the aarch64 rootfs)::

    python arm_replay.py --task task.frame --spec runspec.json --data partition.npz -d mnist5k \
        --client-id 2 --profile rpi4 --out update.npz

``update.npz`` holds the update's arrays; ``update.npz.json`` its sample count, metrics, info, the kernel
backend and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", type=Path, required=True)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("--client-id", type=int, required=True)
    p.add_argument("--profile", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.profile:  # as `fedcmd-edge run --profile` does, before the kernels are imported
        from edge_agent.profiles import apply_kernel_choice, get_profile

        apply_kernel_choice(get_profile(a.profile))
    import numpy as np
    import torch

    import fedcmd_core.kernels as kernels
    from fedcmd_core.data import Partition, load_dataset
    from fedcmd_core.runspec import RunSpec, build_client
    from fedcmd_core.strategies import ClientData, Task
    from protocols.codec import decode

    torch.set_num_threads(a.threads)
    spec = RunSpec.model_validate_json(a.spec.read_text())
    part = Partition.load(a.data)
    ds = load_dataset(a.dataset, **part.dataset_options(a.dataset))
    part.check(ds, source=str(a.data))
    tr, te = torch.from_numpy(part.train[a.client_id]), torch.from_numpy(part.test[a.client_id])
    local = ClientData(ds.x[tr], ds.y[tr], ds.x[te], ds.y[te])
    client = build_client(spec, a.client_id, local, model=spec.build_model())
    header, arrays = decode(a.task.read_bytes())
    if header.type != "task" or header.client != a.client_id:
        print(f"error: {a.task} is a {header.type} frame for client {header.client}", file=sys.stderr)
        return 2
    task = Task(header.round, "evaluate" if header.kind == "evaluate" else "fit", arrays, header.payload)
    update = client.evaluate(task) if task.kind == "evaluate" else client.fit(task)
    np.savez(a.out, **{k: np.asarray(v) for k, v in update.arrays.items()})
    meta = {
        "num_samples": update.num_samples,
        "metrics": update.metrics,
        "info": update.info,
        "backend": kernels.backend(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }
    Path(f"{a.out}.json").write_text(json.dumps(meta, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
