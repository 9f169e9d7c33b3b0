"""Native CPU kernels (XLA FFI custom calls), built from their C++ source on first use.

At decode shapes XLA:CPU spends most of a paged-attention step gathering pool blocks, several
times what reading the keys once costs; `kernels/paged_attention.cc` reads them in place. It is
compiled with the machine's C++ compiler (-march=native, against the XLA FFI headers that jaxlib
ships) into $SWIFTKV_JAX_KERNEL_CACHE (default ~/.cache/swiftkv-jax/kernels), keyed by source,
jaxlib, compiler and CPU, and loaded once per process. Without a compiler, or with
SWIFTKV_JAX_CPU_KERNELS=off, callers get None and keep XLA's own path (equal to float32 rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..compile_cache import user_cache_dir

SOURCE = Path(__file__).resolve().parent / "paged_attention.cc"
PAGED_ATTENTION_TARGET = "swiftkv_paged_attention"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
ENABLE_ENV = "SWIFTKV_JAX_CPU_KERNELS"
_registered = False


def kernel_cache_dir() -> Path:
    """$SWIFTKV_JAX_KERNEL_CACHE, default ~/.cache/swiftkv-jax/kernels."""
    return user_cache_dir("SWIFTKV_JAX_KERNEL_CACHE", "kernels")


def kernels_enabled() -> bool:
    """False when SWIFTKV_JAX_CPU_KERNELS is off/0/false (XLA's own ops everywhere)."""
    return os.environ.get(ENABLE_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU: built once (atomically), then reused."""
    import jaxlib
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, compiler, *FLAGS,
                                    platform.machine(), _cpu_signature()]).encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    library = folder / f"{SOURCE.stem}-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    print(f"swiftkv-jax: building the CPU decode-attention kernel (once per machine) into {folder}",
          file=sys.stderr, flush=True)
    try:
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, library)  # concurrent builders each write their own file; last one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


@functools.cache
def paged_attention_target() -> str | None:
    """The registered custom-call name of the paged-attention kernel, or None where it cannot be
    used (disabled, not a single-CPU-device process, no compiler, build failed: warned once)."""
    if not kernels_enabled() or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C++ compiler (set CXX or install g++): decode attention uses XLA's "
                      "slower gather path", RuntimeWarning, stacklevel=2)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"building the CPU paged-attention kernel failed, using XLA's path: "
                      f"{detail.strip()[-500:]}", RuntimeWarning, stacklevel=2)
        return None
    global _registered
    if not _registered:  # XLA refuses a second, different handler under the same name
        jax.ffi.register_ffi_target(PAGED_ATTENTION_TARGET,
                                    jax.ffi.pycapsule(library.SwiftkvPagedAttention), platform="cpu")
        _registered = True
    return PAGED_ATTENTION_TARGET


def paged_attention(target: str, q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    block_table: jax.Array, q_pos: jax.Array, block_size: int) -> jax.Array:
    """The kernel's call: same contract as attention.attend_paged for float32 q/pools."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k_pool, v_pool, block_table.astype(jnp.int32), q_pos.astype(jnp.int32),
                block_size=np.int64(block_size))
