#!/usr/bin/env bash
# The block-diffusion figures an accelerator gives, in one run (each bench at most LIMIT_S
# seconds, 150 by default): the ~125M train steps' MFU (`bd3lm` at blocks of 16 and 4, its
# doubled sequence counted, against `ar_125m`; blocks of 8 with the noised half on the last
# NOISED layers, 2 by default), the KV-cache samplers' tokens/s (`ar` against `bd3lm` two
# tokens per call and one per call, and two per call in blocks of 8 with the shallow noised
# half; random parameters, 8 rows x 256 tokens) and the
# cost of one cached call as its new positions grow. One JSON line per figure, after its name.
# With random parameters a `bd3lm` row stops counting at its EOS while `ar` counts every
# position: compare the samplers' `seconds` where `network_calls` shows a full run (256
# for `ar`, 128 for two per call), or pass trained parameters (AR_WORKDIR, BD3LM_WORKDIR).
#   tools/accelerator_figures.sh                       # on a GPU or TPU
#   AR=configs/ar.py BD3LM=configs/bd3lm.py:tiny ATTENTION=auto tools/accelerator_figures.sh
#                                                      # the same at the CPU shape
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
ar=${AR:-configs/ar_125m.py}
bd=${BD3LM:-configs/bd3lm.py}
attention=${ATTENTION:-cudnn_packed}
limit=${LIMIT_S:-150}
steps=${STEPS:-15}

bench() {   # NAME ARGS...: one tools/bench.py line, prefixed by NAME
  local name=$1; shift
  local line
  line=$(timeout "$limit" "$py" tools/bench.py "$@" 2>/dev/null | tail -1)
  [ -n "$line" ] || line="{\"error\": \"no result in ${limit} s (a timeout or a failure)\"}"
  echo "$name $line"
}

train=(--steps="$steps" --warmup=3 --doc_len=16384 --config.model.attention="$attention")
bench ar_train --config="$ar" "${train[@]}"
bench bd3lm16_train --config="$bd" "${train[@]}"
bench bd3lm4_train --config="$bd" --config.objective.block_size=4 "${train[@]}"
shallow=(--config="$bd" --config.objective.block_size=8 --config.objective.noised_layers="${NOISED:-2}")
bench bd3lm8_shallow_train "${shallow[@]}" "${train[@]}"

sample=(--sample_len=256 --sample_batch=8)
b4=(--config="$bd" --config.objective.block_size=4 --sampler=bd3lm "${sample[@]}"
    ${BD3LM_WORKDIR:+--workdir="$BD3LM_WORKDIR"})
bench ar_sampler --config="$ar" --sampler=ar "${sample[@]}" ${AR_WORKDIR:+--workdir="$AR_WORKDIR"}
bench bd3lm4_two_per_call "${b4[@]}" --rule=dilated --sample_steps=2
bench bd3lm4_one_per_call "${b4[@]}" --rule=random --sample_steps=4
bench bd3lm8_shallow_two_per_call "${shallow[@]}" --sampler=bd3lm "${sample[@]}" \
    --rule=dilated --sample_steps=4 ${BD3LM8_WORKDIR:+--workdir="$BD3LM8_WORKDIR"}
bench call_positions --config="$bd" --config.objective.block_size=4 --steps=128 \
    --sample_len=256 --call_positions=1,2,4,8,16,32
