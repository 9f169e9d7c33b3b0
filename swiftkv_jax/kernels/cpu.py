"""Native CPU kernels (XLA FFI custom calls), built from their C++ source on first use.

At decode shapes XLA:CPU spends most of a paged-attention step gathering pool blocks, several
times what reading the keys once costs; `kernels/paged_attention.cc` reads them in place. It
converts int8 weights to float32 whole before a matmul; `kernels/int8_matmul.cc` reads them in
place for the few rows of a decode step (and, with AVX-512 VNNI, for prefill chunks). Each source
is compiled with the machine's C++ compiler (-march=native, against the XLA FFI headers that
jaxlib ships) into $SWIFTKV_JAX_KERNEL_CACHE (default ~/.cache/swiftkv-jax/kernels), keyed by
source, jaxlib, compiler and CPU, and loaded once per process. Without a compiler, or with
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

HERE = Path(__file__).resolve().parent
PAGED_ATTENTION_TARGET = "swiftkv_paged_attention"
INT8_MATMUL_TARGET = "swiftkv_int8_matmul"
INT8_DEQUANTISE_TARGET = "swiftkv_int8_dequantise"
INT8_MATMUL_MAX_ROWS = 16  # above this, without AVX-512 VNNI, XLA's dot on a float copy is faster
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
ENABLE_ENV = "SWIFTKV_JAX_CPU_KERNELS"
_registered: set[str] = set()  # XLA refuses a second, different handler under one name


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


def _build(compiler: str, source: Path, what: str) -> Path:
    """The shared library for this source, compiler and CPU: built once (atomically), then reused."""
    import jaxlib
    key = hashlib.sha256("\0".join([source.read_text(), jaxlib.__version__, compiler, *FLAGS,
                                    platform.machine(), _cpu_signature()]).encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    library = folder / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    print(f"swiftkv-jax: building the CPU {what} kernel (once per machine) into {folder}",
          file=sys.stderr, flush=True)
    try:
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, library)  # concurrent builders each write their own file; last one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


@functools.cache
def _target(name: str, source: str, symbol: str, what: str) -> str | None:
    """Registers `symbol` of the library built from `source` as custom call `name`; None where it
    cannot be used (disabled, not a single-CPU-device process, no compiler, build failed: warned
    once per kernel)."""
    if not kernels_enabled() or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(f"no C++ compiler (set CXX or install g++): the {what} uses XLA's slower path",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler, HERE / source, what)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"building the CPU {what} kernel failed, using XLA's path: "
                      f"{detail.strip()[-500:]}", RuntimeWarning, stacklevel=3)
        return None
    if name not in _registered:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered.add(name)
    return name


def forget_targets() -> None:
    """Makes the next *_target() call decide again (after SWIFTKV_JAX_CPU_KERNELS or CXX changed)."""
    _target.cache_clear()


def paged_attention_target() -> str | None:
    """The custom-call name of the paged-attention kernel, or None (XLA's gather path then)."""
    return _target(PAGED_ATTENTION_TARGET, "paged_attention.cc", "SwiftkvPagedAttention",
                   "decode-attention")


def int8_matmul_target() -> str | None:
    """The custom-call name of the int8 weight matmul kernel, or None (XLA's convert + dot)."""
    return _target(INT8_MATMUL_TARGET, "int8_matmul.cc", "SwiftkvInt8Matmul", "int8 matmul")


def int8_dequantise_target() -> str | None:
    """The custom-call name of the threaded int8 -> float32 conversion (same library), or None."""
    return _target(INT8_DEQUANTISE_TARGET, "int8_matmul.cc", "SwiftkvInt8Dequantise", "int8 matmul")


def paged_attention(target: str, q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    block_table: jax.Array, q_pos: jax.Array, block_size: int) -> jax.Array:
    """The kernel's call: same contract as attention.attend_paged for float32 q/pools."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k_pool, v_pool, block_table.astype(jnp.int32), q_pos.astype(jnp.int32),
                block_size=np.int64(block_size))


INT8_PATHS = {"best": 0, "scalar": 1, "float": 2}  # the kernel's loops (int8_matmul.cc's Path)


def int8_matmul(target: str, x: jax.Array, w: jax.Array, scales: jax.Array,
                path: str = "best") -> jax.Array:
    """x [R, K] float32 @ (w [N, K] int8 * scales [N, K / B] per block of B inputs).T -> [R, N]
    float32. `path`: "best" (AVX-512 VNNI with x quantised per 32 inputs where the CPU has it and
    K % 64 == B % 32 == 0; else AVX2 float), "float" (AVX2 float products), "scalar" (tests)."""
    return int8_matmuls(target, x, [(w, scales)], path)[0]


def int8_matmuls(target: str, x: jax.Array, weights: list[tuple[jax.Array, jax.Array]],
                 path: str = "best") -> list[jax.Array]:
    """int8_matmul of one input with several (w, scales): one call, the threads started once."""
    shapes = [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32) for w, _ in weights]
    call = jax.ffi.ffi_call(target, shapes)
    return list(call(x, *(a for pair in weights for a in pair), path=np.int64(INT8_PATHS[path])))


@functools.lru_cache(maxsize=None)
def int8_vnni() -> bool:
    """Whether the int8 kernel built here takes the AVX-512 VNNI path (rows quantised): what the
    compiler defines for -march=native, as the kernel's #if sees it."""
    compiler = _compiler()
    if compiler is None:
        return False
    macros = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", "-"], input="",
                            capture_output=True, text=True).stdout
    return all(f"__{m}__" in macros for m in ("AVX512F", "AVX512BW", "AVX512VNNI"))


def int8_vnni_applies(k: int, block: int) -> bool:
    """Whether the kernel's VNNI paths take a weight of `k` inputs and scales per `block`
    (int8_matmul.cc's VnniApplies) on this CPU."""
    return k % 64 == 0 and block % 32 == 0 and int8_vnni()


def int8_dequantise(target: str, x: jax.Array, w: jax.Array, scales: jax.Array) -> jax.Array:
    """w [N, K] int8 * scales [N, K / B] per block of B inputs -> float32 [N, K], on every thread,
    once `x` (the matmul's input, not read) exists: so XLA converts each weight just before use."""
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(w.shape, jnp.float32))(x, w, scales)
