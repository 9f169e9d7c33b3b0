"""Attention kernels over the paged pool, one per platform, with XLA's own path as the fallback
everywhere and the reference in tests: cpu.py (a C++ XLA FFI custom call built on first use),
gpu.py and tpu.py (JAX's Pallas kernels; pallas_paged.py: how our pools map onto them)."""
