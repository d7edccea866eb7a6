#!/usr/bin/env bash
# Issue 12's table: pagedllm beside llama.cpp (and transformers) on the same GGUF, the same
# threads, one command after another on an otherwise quiet machine. Results (JSON and the
# peers' raw output) land in $1 (default /tmp/bench-cpu-speed); BENCHMARKS.md quotes them.
#
#   benchmarks/bench_cpu_speed.sh [OUT] [--skip-hf]
#
# Builds llama.cpp's benchmarks once per machine (../shared/peers/llama-cpp.sh, ~10 min).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/bench-cpu-speed}
SKIP_HF=${2:-}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
PY=.venv/bin/python
PAGEDLLM=.venv/bin/pagedllm
MODEL=$($PY -c "from pagedllm.model.loader import default_model_path; print(default_model_path())")
BIN=$(../shared/peers/llama-cpp.sh)
export LD_LIBRARY_PATH=$BIN
{
  date -u +%FT%TZ
  lscpu | grep -E "Model name|^CPU\(s\)"
  grep -m1 -o -E "avx512_vnni|amx_bf16|avx512_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  $PY -c "from pagedllm import cpu_kernels; print('kernel level', cpu_kernels.best_level())"
} | tee "$OUT/machine.txt"

echo "== single stream: 128-token prompt, 128 new tokens"
"$BIN/llama-bench" -m "$MODEL" -p 128 -n 128 -t "$THREADS" -r 3 -o json > "$OUT/llama-bench.json"
$PAGEDLLM bench latency --batch-size 1 --input-len 128 --output-len 128 --num-iters 3 \
  --threads "$THREADS" --json-out "$OUT/latency-b1.json"
$PAGEDLLM bench latency --batch-size 1 --input-len 128 --output-len 128 --num-iters 3 \
  --threads "$THREADS" --exact-matmul --json-out "$OUT/latency-b1-exact.json"

echo "== 32 sequences x (128 + 128)"
"$BIN/llama-batched-bench" -m "$MODEL" -c 8448 -t "$THREADS" -npp 128 -ntg 128 -npl 32 \
  --output-format jsonl > "$OUT/llama-batched-bench.jsonl" 2> "$OUT/llama-batched-bench.log"
$PAGEDLLM bench latency --batch-size 32 --input-len 128 --output-len 128 --num-iters 2 \
  --num-iters-warmup 1 --threads "$THREADS" --json-out "$OUT/latency-b32.json"

echo "== reference workload (64 prompts of 65-246 tokens, 128 new tokens, greedy)"
$PY benchmarks/make_reference_workload.py "$OUT/reference.json"
$PAGEDLLM bench throughput --dataset file --dataset-path "$OUT/reference.json" \
  --temperature 0 --ignore-eos --disable-tqdm --threads "$THREADS" --json-out "$OUT/throughput.json"
if [[ -z $SKIP_HF ]]; then
  for dtype in float32 bfloat16; do
    for batch in 8 32; do
      $PAGEDLLM bench throughput --dataset file --dataset-path "$OUT/reference.json" \
        --temperature 0 --ignore-eos --disable-tqdm --backend hf-only --hf-batch-size $batch \
        --dtype $dtype --threads "$THREADS" --json-out "$OUT/hf-$dtype-$batch.json"
    done
  done
fi

echo "== resident memory: servers holding 8,192 tokens of KV"
$PY benchmarks/server_rss.py --model "$MODEL" --llama-server "$BIN/llama-server" \
  --threads "$THREADS" --json-out "$OUT/rss.json"

echo "== scaling: 64-token prompts, 32 new tokens, all requests at once"
for b in 1 4 16 64 256; do
  $PAGEDLLM bench latency --batch-size $b --input-len 64 --output-len 32 --num-iters 1 \
    --num-iters-warmup 0 --kv-cache-memory 2 --max-num-seqs 256 --threads "$THREADS" \
    --json-out "$OUT/scaling-$b.json"
done
echo "results in $OUT"
