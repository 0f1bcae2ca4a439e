#!/usr/bin/env bash
# The first accelerator figures in one prepared run (one GPU, at most about 8 minutes including compiles):
# the bf16 matmul peak, the attention kernels alone, the JAX / torch twin / diffusers training step at 4 blocks x
# {8k, 33k} tokens (JAX pads the joint sequence to 128 for cuDNN) and the 38-block sampling forward at 41,805 tokens
# with the CFG pair; then the tables go into docs/benchmarks.md with device, date and commit.
#
#   bash tools/bench_device.sh           # on the GPU machine
#   bash tools/bench_device.sh --tiny    # dry run on the CPU (tiny model, about a minute)
#
# Results (JSON, logs, the updated docs page) go to $OUT when it is set, else runs/bench_device/; the dry run updates
# only that copy of the docs page. A case that fails
# (out of memory, an unsupported kernel) becomes a row with its error; the script goes on and exits 1 at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/bench_device}
mkdir -p "$out"
start=$(date +%s)
commit=${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "${1:-}" = "--tiny" ]; then
  train=(--tiny --tokens 40,136 --warmup 1 --repeats 2)
  sample=(--tiny --tokens 136 --warmup 1 --repeats 2)
  command="bash tools/bench_device.sh --tiny"
  cp docs/benchmarks.md "$out/benchmarks.md"
  docs="$out/benchmarks.md"
else
  train=(--blocks 4 --tokens 8192,33093 --pad-to 128 --warmup 2 --repeats 5 --case-timeout 240)
  sample=(--tokens 41805 --pad-to 128 --warmup 1 --repeats 3 --case-timeout 300)
  command="bash tools/bench_device.sh"
  docs=docs/benchmarks.md
fi
status=0
python -m tools.bench --mode train "${train[@]}" --out "$out/bench_train.json" 2>&1 | tee "$out/bench_train.log" || status=1
python -m tools.bench --mode sample --cfg-batch "${sample[@]}" --out "$out/bench_sample.json" 2>&1 |
  tee "$out/bench_sample.log" || status=1
python -m tools.bench_report "$out/bench_train.json" "$out/bench_sample.json" --docs "$docs" \
  --commit "$commit" --wall "$(($(date +%s) - start))" --command "$command" || status=1
[ "$docs" = "$out/benchmarks.md" ] || cp "$docs" "$out/benchmarks.md"
exit $status
