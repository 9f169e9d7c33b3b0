"""int8 weights: a Linear weight stored as int8 with a float32 scale per block of inputs, and the
matmul and embedding lookup that read it.

Decode at small batch reads every weight once per step, so a quarter of the bytes is up to 4x the
speed. An `Int8Weight` holds `values` [out..., in...] (each output's inputs contiguous, as Hugging
Face and GGUF store Linear weights: the layout a kernel streams) and `scales` [out..., blocks],
symmetric: weight = values * scale of its block of `block` inputs. Which tensors are quantised, and
which of their axes are the inputs, is declared in params.SCHEMA (`quant_in`).

`matmul` picks its implementation per platform at lowering, like the attention kernels: on CPU the
native kernel (kernels/int8_matmul.cc) for the few rows of a decode step, and for prefill chunks
too where the CPU has AVX-512 VNNI (integer dot products, rows quantised per 32 inputs: several
times float32's rate); on other CPUs prefill chunks use XLA's dot on a float copy the same library
makes just before it (XLA's own conversion was hoisted to the program's start for every layer at
once: a 1000-token prefill took 1.25x float32's); elsewhere XLA's dot on the weight converted and
scaled in the same program (on GPU/TPU XLA fuses the conversion into the dot's operand).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from ..kernels import cpu as cpu_kernels

F32 = jnp.float32
INT8_MAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """values int8 [out..., in...] and float32 scales [out..., in_size / block]; the last `in_dims`
    dims of values are the inputs."""

    values: jax.Array
    scales: jax.Array
    in_dims: int = dataclasses.field(metadata=dict(static=True))

    @property
    def in_size(self) -> int:
        return math.prod(self.values.shape[len(self.values.shape) - self.in_dims:])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:len(self.values.shape) - self.in_dims])

    @property
    def block(self) -> int:
        """Inputs per scale."""
        return self.in_size // self.scales.shape[-1]


def block_for(in_size: int, block: int) -> int:
    """The block a tensor of `in_size` inputs gets: `block` where it divides in_size, else one
    scale per output (block = in_size). 0 asks for one scale per output."""
    return block if block and in_size % block == 0 else in_size


def quantised_shapes(shape: Sequence[int], quant_in: Sequence[int], block: int
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(values shape, scales shape) of a float tensor of `shape` whose axes `quant_in` are inputs."""
    out = tuple(d for i, d in enumerate(shape) if i not in quant_in)
    ins = tuple(shape[i] for i in quant_in)
    k = math.prod(ins)
    return out + ins, out + (k // block_for(k, block),)


def quantise(w: jax.Array, quant_in: Sequence[int], block: int) -> Int8Weight:
    """Symmetric int8 of a float weight in our layout; `quant_in` are its input axes."""
    out_axes = [i for i in range(w.ndim) if i not in quant_in]
    v = jnp.transpose(jnp.asarray(w, F32), out_axes + list(quant_in))
    out_shape, k = v.shape[:len(out_axes)], math.prod(w.shape[i] for i in quant_in)
    b = block_for(k, block)
    blocks = v.reshape(out_shape + (k // b, b))
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    values = jnp.clip(jnp.round(blocks / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Weight(values.reshape(v.shape), scale[..., 0], len(quant_in))


def dequantise(q: Int8Weight, quant_in: Sequence[int], dtype=F32) -> jax.Array:
    """The float weight in our layout (the inverse of `quantise` up to its rounding)."""
    w = _float_values(q, dtype)
    order = [i for i in range(w.ndim) if i not in quant_in] + list(quant_in)  # our axis order[j] is w's j
    return jnp.transpose(w, [order.index(i) for i in range(w.ndim)])


def _float_values(q: Int8Weight, dtype) -> jax.Array:
    """values * scales in `dtype`, shaped as values."""
    blocks = q.values.reshape(q.out_shape + (q.scales.shape[-1], q.block))
    return (blocks.astype(dtype) * q.scales[..., None].astype(dtype)).reshape(q.values.shape)


def matmul(x: jax.Array, w: Int8Weight, out_dtype=None) -> jax.Array:
    """x [..., in_size] @ w -> [..., out...] in `out_dtype` (default x's; float32 accumulation)."""
    return matmuls(x, [w], out_dtype)[0]


def matmuls(x: jax.Array, ws: Sequence[Int8Weight], out_dtype=None) -> list[jax.Array]:
    """matmul(x, w) for each of `ws` (one input: q/k/v, gate/up); on CPU decode rows one kernel
    call for all of them, so its threads start once (a decode step's calls are short and in a row)."""
    k = ws[0].in_size
    x2 = x.reshape(-1, k)
    flat = [(w.values.reshape(-1, k), w.scales.reshape(math.prod(w.out_shape), -1)) for w in ws]

    def dot(x2: jax.Array, v2: jax.Array, s2: jax.Array, convert=None) -> jax.Array:
        wf = convert(v2, s2) if convert else _float_values(Int8Weight(v2, s2, 1), x.dtype)
        return jax.lax.dot_general(x2, wf, (((1,), (1,)), ((), ())), preferred_element_type=F32)

    def xla(x2: jax.Array, *pairs: jax.Array) -> list[jax.Array]:
        return [dot(x2, pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]

    in_place = x2.shape[0] <= cpu_kernels.INT8_MATMUL_MAX_ROWS or all(
        cpu_kernels.int8_vnni_applies(k, w.block) for w in ws)
    target = cpu_kernels.int8_matmul_target() if in_place else cpu_kernels.int8_dequantise_target()
    pairs = [a for pair in flat for a in pair]
    if target is not None and x.dtype == F32:
        if in_place:  # decode rows (and chunks on VNNI): the kernel reads the int8 weights in place
            def on_cpu(x2, *pairs):
                return cpu_kernels.int8_matmuls(target, x2, list(zip(pairs[::2], pairs[1::2])))
        else:  # prefill chunks: XLA's dot on a float copy made on every thread
            def on_cpu(x2, *pairs):
                copy = lambda v, s: cpu_kernels.int8_dequantise(target, x2, v, s)
                return [dot(x2, pairs[i], pairs[i + 1], copy) for i in range(0, len(pairs), 2)]
        ys = jax.lax.platform_dependent(x2, *pairs, cpu=on_cpu, default=xla)
    else:
        ys = xla(x2, *pairs)
    return [y.astype(out_dtype or x.dtype).reshape(x.shape[:-1] + w.out_shape) for y, w in zip(ys, ws)]


def lookup(table: Int8Weight, tokens: jax.Array, dtype=F32) -> jax.Array:
    """Rows `tokens` of an int8 embedding table [V, D] as floats: only those rows are converted."""
    return _float_values(Int8Weight(table.values[tokens], table.scales[tokens], 1), dtype)


def to_dicts(tree):
    """`tree` with every Int8Weight as a plain {"values", "scales"} dict (how checkpoints store it)."""
    return jax.tree.map(lambda x: {"values": x.values, "scales": x.scales} if isinstance(x, Int8Weight)
                        else x, tree, is_leaf=lambda x: isinstance(x, Int8Weight))


def from_dicts(tree):
    """The inverse of to_dicts: {"values", "scales"} dicts back into Int8Weights."""
    if isinstance(tree, dict):
        if set(tree) == {"values", "scales"}:
            values, scales = tree["values"], tree["scales"]
            return Int8Weight(values, scales, len(values.shape) - len(scales.shape) + 1)
        return {k: from_dicts(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(from_dicts(v) for v in tree)
    return tree
