"""Native kernels with their XLA references: decode attention over the paged pool on CPU (a C++
XLA FFI custom call built on first use, cpu.py). XLA's own path is the fallback everywhere."""
