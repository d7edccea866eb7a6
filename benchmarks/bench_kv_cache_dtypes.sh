#!/usr/bin/env bash
# Issue 14: every number of BENCHMARKS.md's "Quantized KV cache" section, one command after
# another on an otherwise idle machine (2 threads). Usage: bench_kv_cache_dtypes.sh OUT_DIR
set -euo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
PY=.venv/bin/python
PAGEDLLM=.venv/bin/pagedllm
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/machine.txt"
date -u | tee -a "$OUT/machine.txt"

echo "== decode attention kernel, one layer (3 KV heads, head_dim 64)"
$PY benchmarks/bench_kv_cache.py --seqs 1 64 --context 2048 1024 | tee "$OUT/kernel.txt"

echo "== capacity: 64 MiB of KV cache, 64 requests of 512 + 128 tokens"
for kv in float32 bfloat16 int8 fp8; do
  $PAGEDLLM bench throughput --dataset random --num-prompts 64 --input-len 512 \
    --output-len 128 --ignore-eos --kv-cache-memory 0.0625 --kv-cache-dtype "$kv" \
    --json-out "$OUT/capacity-$kv.json" --disable-tqdm | grep -E "capacity|Peak running|Preemptions|Output tokens/s" | sed "s/^/$kv: /"
done

echo "== single stream, 2048-token prompt, 128 new tokens"
for kv in float32 int8 fp8; do
  $PAGEDLLM bench latency --batch-size 1 --input-len 2048 --output-len 128 --num-iters 2 \
    --num-iters-warmup 1 --kv-cache-dtype "$kv" --json-out "$OUT/single-$kv.json" \
    | grep -E "TPOT mean|Output tokens/s" | sed "s/^/$kv: /"
done

echo "== 64 sequences, 1024-token prompts, 64 new tokens"
for kv in float32 int8 fp8; do
  $PAGEDLLM bench latency --batch-size 64 --input-len 1024 --output-len 64 --num-iters 1 \
    --num-iters-warmup 0 --kv-cache-memory 4 --kv-cache-dtype "$kv" \
    --json-out "$OUT/batch64-$kv.json" | grep -E "TPOT mean|Output tokens/s" | sed "s/^/$kv: /"
done

echo "== greedy agreement with the float32 cache, reference workload"
$PY benchmarks/make_reference_workload.py "$OUT/reference.json"
$PY benchmarks/kv_cache_agreement.py "$OUT/reference.json" bfloat16 int8 fp8 fp8_e5m2 | tee "$OUT/agreement.txt"
