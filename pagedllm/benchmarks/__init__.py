"""Benchmarks: seeded datasets, and the throughput and latency commands (`pagedllm bench`)."""
