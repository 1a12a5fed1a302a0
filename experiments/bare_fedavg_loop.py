"""The speed baseline of issue 2: FedAvg on a shared partition as a bare Python loop (no coordinator,
no transport, no framing), with the same model, data and local training as `fedcmd simulate`.

    /usr/bin/time -v .venv/bin/python experiments/bare_fedavg_loop.py ../shared/data/mnist5k-d01-s42.npz
    /usr/bin/time -v .venv/bin/fedcmd simulate --algo fedavg -d mnist5k --partition ... -jr 0.2 -ge 60 -tg 0

It samples clients and seeds each client's shuffling exactly as the coordinator and ClientStrategy do
(``default_rng(seed).choice`` over the clients; one torch stream per (seed, round, client)), so its
accuracy is comparable with ours too. ``fedcmd bench simulate`` times it against ours, whole process.
Arguments: PARTITION [ROUNDS] [JOIN_RATIO] [SEED].
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from fedcmd_core.data import Partition, load_dataset
from fedcmd_core.models import build_model


def main(path: str, rounds: int = 60, join_ratio: float = 0.2, seed: int = 42) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset("mnist5k")
    part = Partition.load(path, data)
    model = build_model("lenet5", data.input_shape, data.num_classes, seed=seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    n = part.num_clients
    accs = []
    for rnd in range(rounds):
        picked = rng.choice(n, max(1, int(n * join_ratio)), replace=False).tolist()  # Coordinator.sample
        states, sizes, correct, count = [], [], 0, 0
        for c in picked:
            tr, te = torch.from_numpy(part.train[c]), torch.from_numpy(part.test[c])
            x, y, xt, yt = data.x[tr], data.y[tr], data.x[te], data.y[te]
            model.load_state_dict(global_state)
            model.eval()
            with torch.no_grad():
                correct += int((model(xt).argmax(1) == yt).sum())
                count += len(yt)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            stream = (seed * 1_000_003 + rnd * 10_007 + int(c)) % (2**63)  # ClientStrategy._generator
            torch.manual_seed(stream)
            g = torch.Generator().manual_seed(stream)
            for _ in range(5):
                order = torch.randperm(len(x), generator=g)
                for b in range(0, len(x), 32):
                    idx = order[b : b + 32]
                    if len(idx) <= 1:
                        continue
                    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            sizes.append(len(x))
        w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
        for k in global_state:
            stacked = torch.stack([s[k].float() for s in states])
            mean = (stacked * w.view(-1, *[1] * (stacked.dim() - 1))).sum(0)
            global_state[k] = mean.to(global_state[k].dtype)
        accs.append(100.0 * correct / count)
    print(f"bare loop: last-10 mean {np.mean(accs[-10:]):.2f}%  {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]) if len(a) > 1 else 60, float(a[2]) if len(a) > 2 else 0.2, int(a[3]) if len(a) > 3 else 42)
