#!/usr/bin/env bash
# Side-by-side CPU throughput: x-transformers (PyTorch) vs this project, alternated ROUNDS
# times on the same machine, medians printed. XT_PYTHON is a Python of a separate environment
# holding torch and x-transformers (never a dependency of this project).
#   XT_PYTHON=/tmp/xt/bin/python tools/compare_xtransformers.sh [ROUNDS] [WRAPPER] [CONFIG]
# WRAPPER ar (default; against configs/ar.py), nar (NonAutoregressiveWrapper; against
# configs/default.py, the tiny MDLM) or bst (BeliefStateWrapper, one shared decoder; against
# bst with shared decoders, one document per row); CONFIG overrides the config bench.py runs.
# SEQ_LEN and BATCH_SIZE (default 256 and 16) set the shape of both.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
wrapper=${2:-ar}
seq=${SEQ_LEN:-256}
batch=${BATCH_SIZE:-16}
extra=()
case "$wrapper" in
  ar) config=${3:-configs/ar.py} ;;
  nar) config=${3:-configs/default.py} ;;
  bst) config=${3:-configs/default.py}
       extra=(--config.objective.name=bst --config.objective.shared_decoders=true --doc_len=0) ;;
  *) config=${3:?give the config to compare with} ;;
esac
xt=${XT_PYTHON:?set XT_PYTHON to the python of an environment with torch and x-transformers}
py=${PYTHON:-python}
log=$(mktemp)
for _ in $(seq "$rounds"); do
  "$xt" tools/bench_xtransformers.py --wrapper "$wrapper" --steps "${STEPS:-15}" \
      --seq_len "$seq" --batch_size "$batch" 2>/dev/null | tail -1 | sed 's/^/xt /' >> "$log"
  "$py" tools/bench.py --config="$config" --steps="${STEPS:-15}" --config.data.seq_len="$seq" \
      --config.train.batch_size="$batch" "${extra[@]}" 2>/dev/null | tail -1 | sed 's/^/ours /' >> "$log"
done
"$py" - "$log" <<'PY'
import json, statistics, sys
runs = {"xt": [], "ours": []}
for line in open(sys.argv[1]):
  name, _, payload = line.partition(" ")
  runs[name].append(json.loads(payload)["tokens_per_s"])
med = {k: statistics.median(v) for k, v in runs.items()}
print(json.dumps({"xtransformers_tokens_per_s": sorted(runs["xt"]),
                  "ours_tokens_per_s": sorted(runs["ours"]),
                  "ratio_of_medians": med["ours"] / med["xt"]}))
PY
