"""Benchmarks run as scripts: bench/quality.py (cross-validated quality), bench/gpu_bench.py (GPU speed)."""
