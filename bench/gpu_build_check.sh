#!/usr/bin/env bash
# The checks a build gets on one GPU machine before a session ends (device: see docs/PERFORMANCE.md): the server's
# throughput, structured outputs in the engine, CUDA training of each variant, and the static decoder of every
# family against transformers. Each writes its JSON under $OUT; a table of what passed and how long each took ends
# the log. Needs .gpu_assets/smol (config.json and tokenizer files of the embedded model, no weights) and, where
# the image lacks them, the server's wheels in .whl (docs/PERFORMANCE.md names them).
#   bash bench/gpu_build_check.sh
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
SUMMARY=()
step() {  # step NAME COMMAND...: run it, its output in $OUT/NAME.log, and note the exit status and seconds
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    SUMMARY+=("$(printf '%-26s rc=%-3s %5ss' "$name" "$rc" "$((SECONDS - start))")")
    tail -n 25 "$OUT/$name.log"
}
step serve_bench python3 bench/serve_bench.py --random-from .gpu_assets/smol --shape 1b --requests 64 --max-tokens 32 \
    --decoder static
step structured_outputs python3 bench/structured_outputs_check.py --rows 32
step train_cuda_smoke python3 bench/train_cuda_smoke.py .gpu_assets/smol
step static_families python3 bench/static_families_check.py --long-families none
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
