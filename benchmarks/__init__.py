"""Benchmarks of the sampler, outside the library: `sedd bench` (sedd_bench), the GPU check (gpu_check),
the naive reference loop (naive), synthetic models (presets) and measuring helpers (measure)."""
