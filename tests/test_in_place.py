"""The step programs' structure: the KV pools are updated in place (a pool copy costs the whole
pool's bytes per layer per step, so a step's time would grow with the pool, not with the work),
and each kind of layer is traced once per program (start-up)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import swiftkv_jax as sk
from swiftkv_jax.runtime.request import MAX_STOP_IDS
from swiftkv_jax.runtime.runner import decode_program, mixed_program
from swiftkv_jax.runtime.sampling import SamplingParams
from swiftkv_jax.runtime.slots import empty_slots
from swiftkv_jax.runtime.steps import decode, namespace_of, prefill

CFG = sk.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


def pool_copies(compiled_text: str, pool: jax.Array) -> int:
    """How many `copy` instructions produce an array of the pool's shape."""
    shape = f"f32[{','.join(map(str, pool.shape))}]"
    return len(re.findall(rf"= {re.escape(shape)}\S* copy\(", compiled_text))


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_and_prefill_of_some_rows_never_copy_the_pool(rows):
    params = sk.init_params(CFG, jax.random.PRNGKey(0))
    cache = sk.init_cache(params, 8, 192)  # 8 slots; the step touches `rows` of them (a pool this
    # size is what made XLA copy it: at 4 x 64 tokens it did not)
    slots = jnp.arange(rows, dtype=jnp.int32)
    ones = jnp.ones((rows,), jnp.int32)
    step = decode.lower(params, cache, slots, ones, ones, ones * 9,
                        SamplingParams.make(jnp.zeros(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows)),
                        jnp.zeros((rows, 2), jnp.uint32), jnp.full((rows, MAX_STOP_IDS), -1, jnp.int32),
                        jnp.int32(4), out_len=4).compile().as_text()
    assert pool_copies(step, cache.k[0]) == 0
    one_token = prefill.lower(params, cache, jnp.ones((rows, 1), jnp.int32), ones, slots).compile().as_text()
    assert pool_copies(one_token, cache.k[0]) == 0


def test_the_engines_mixed_and_decode_programs_never_copy_the_pool():
    params = sk.init_params(CFG, jax.random.PRNGKey(0))
    cache = sk.init_cache(params, 8, 192)
    state = empty_slots(8, cache.max_length, params.config.vocab_size)
    rows = jnp.arange(1 + 1 + 8, dtype=jnp.int32)  # one chunk row, its token count, 8 decode rows
    step = mixed_program.lower(params, cache, state, rows, namespace_of(params.weights), chunk_rows=1,
                               width=16).compile().as_text()
    assert pool_copies(step, cache.k[0]) == 0
    for out_len in (1, 4):
        step = decode_program.lower(params, cache, state, jnp.arange(3, dtype=jnp.int32),
                                    out_len=out_len).compile().as_text()
        assert pool_copies(step, cache.k[0]) == 0


def _layer_calls(jaxpr, found: dict[str, list[int]]) -> dict[str, list[int]]:
    """{jitted function name: [id of its traced jaxpr, one per call]} over a jaxpr and every
    jaxpr nested in it (loops, conditions, inner jits)."""
    for eqn in jaxpr.eqns:
        name = eqn.params.get("name")
        if name in ("decoder_layer", "swiftkv_layer"):
            found.setdefault(name, []).append(id(eqn.params["jaxpr"].jaxpr))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _layer_calls(inner, found)
    return found


def test_each_kind_of_layer_is_traced_once_per_program():
    """Start-up: a program's 30 layers are one traced function called 30 times (XLA inlines the
    calls), not 30 traces; plain layers and SwiftKV upper layers one each."""
    cfg = sk.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=6,
                         num_heads=4, num_kv_heads=2, head_dim=8, num_key_value_layers=3)
    params = sk.init_params(cfg, jax.random.PRNGKey(0))
    cache = sk.init_cache(params, 2, 64)
    traced = prefill.trace(params, cache, jnp.ones((2, 16), jnp.int32), jnp.full((2,), 16, jnp.int32))
    calls = _layer_calls(traced.jaxpr.jaxpr, {})
    assert {name: (len(ids), len(set(ids))) for name, ids in calls.items()} == \
        {"decoder_layer": (3, 1), "swiftkv_layer": (3, 1)}
