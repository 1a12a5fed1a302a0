#!/usr/bin/env bash
# Parity with the released code on the shared partitions (REFERENCE.md §6):
# 50 clients, join ratio 0.2, 60 rounds, 5 local epochs, batch 32, lr 0.01, seed = partition seed,
# FedCMD selection phase 6 rounds. Usage: experiments/parity.sh [OUT_DIR] [ALGO_SPEC...]
# An ALGO_SPEC is NAME[:hp=value,hp=value] and names the run folder.
set -euo pipefail
out=${1:-runs/parity}; shift || true
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(local fedavg fedper pfedsim fedcmd:body_mode=relay fedcmd)
data=${SHARED_DATA:-../shared/data}
bin=${FEDCMD:-.venv/bin/fedcmd}
for spec in "${specs[@]}"; do
  algo=${spec%%:*}; hps=(); name=$algo
  if [[ $spec == *:* ]]; then
    IFS=, read -ra kv <<< "${spec#*:}"
    for x in "${kv[@]}"; do hps+=(--hp "$x"); done
    name="$algo-${spec#*:}"; name=${name//=/-}; name=${name//,/_}
  fi
  [[ $algo == fedcmd ]] && hps+=(--hp selection_rounds=6)
  for s in 42 43 44; do
    "$bin" simulate --algo "$algo" -d mnist5k --partition "$data/mnist5k-d01-s$s.npz" --seed "$s" \
      -jr 0.2 -ge 60 -le 5 -bs 32 -lr 0.01 -tg 0 "${hps[@]}" --out "$out/$name/s$s" --force --quiet
  done
done
.venv/bin/python - "$out" <<'PY'
import json, sys, pathlib, statistics as st
root = pathlib.Path(sys.argv[1])
for d in sorted(p for p in root.iterdir() if p.is_dir()):
    vals = []
    for s in (42, 43, 44):
        f = d / f"s{s}" / "summary.json"
        if f.is_file():
            vals.append(json.loads(f.read_text()))
    if vals:
        pm = [v["paper_metric"] for v in vals]; fin = [v["final_personalized_acc"] for v in vals]
        spr = [v["seconds_per_round"] for v in vals]
        print(f"{d.name:40s} " + " ".join(f"{x:6.2f}" for x in pm) + f"  mean {st.mean(pm):6.2f}"
              f"  final-all {st.mean(fin):6.2f}  s/round {st.mean(spr):.3f}")
PY
