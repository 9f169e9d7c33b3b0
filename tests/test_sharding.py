"""Sharding over a Mesh: rules, fallbacks, memory estimates, and (in a subprocess that sees 8 CPU
devices) sharded generate / prefix cache / distillation / checkpoints equal to one device.

The multi-device checks run in one subprocess (`python tests/test_sharding.py checks`) with
`--xla_force_host_platform_device_count=8`, so the rest of the suite keeps one device and the
expensive start-up and compiles are paid once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swiftkv_jax as sk
from swiftkv_jax import sharding as sh
from swiftkv_jax.sharding import DATA, MODEL, P

ROOT = Path(__file__).resolve().parent.parent
PLAIN = sk.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_layers=2,
                       num_heads=8, num_kv_heads=8, head_dim=8, eos_token_ids=())
# 4 kv heads: split over model=4, replicated (with a warning) over model=8; AcrossKV g = 2.
SWIFT = PLAIN.replace(num_layers=4, num_kv_heads=4, num_key_value_layers=2, key_value_group_size=2,
                      tie_word_embeddings=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [3] * 7, [5], [9, 8, 7, 6], [2, 2], [4, 5, 6], [11] * 6]
# Each mesh shape tests its own rule: model=8 splits plain's 8 kv heads and falls back (replicated,
# with a warning) for SwiftKV's 4; 8x1 is data parallel alone; 2x4 splits both axes (plain on 2x4 is
# also checked by the pool-over-data run and the two-process run).
MESHES = {"plain": ("1x8", "8x1"), "swiftkv": ("2x4", "1x8")}


# -- single device: rules, parsing, memory ----------------------------------------------------

def test_parse_mesh():
    assert sh.parse_mesh("data=2,model=4", 8) == {DATA: 2, MODEL: 4}
    assert sh.parse_mesh("2x4", 8) == {DATA: 2, MODEL: 4}
    assert sh.parse_mesh("model=-1", 8) == {DATA: 1, MODEL: 8}
    assert sh.parse_mesh(None, 4) == {DATA: 1, MODEL: 4}
    for bad in ("data=3,model=4", "pipe=8", "data=x", "data=-1,model=-1"):
        with pytest.raises(sh.ShardingError):
            sh.parse_mesh(bad, 8)
    mesh = sh.make_mesh("data=1,model=1")
    assert dict(mesh.shape) == {DATA: 1, MODEL: 1}


def test_rules_cover_every_leaf_and_fall_back_with_a_warning():
    w = sh.abstract_weights(SWIFT, teacher=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = sh.param_specs(w, {DATA: 2, MODEL: 8})
    flat = dict(zip((sh.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(w)[0]),
                    jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))))
    assert flat["embed_tokens"] == P(MODEL, None)
    assert flat["layers/*/q_proj_swiftkv"] == P(None, MODEL, None)
    assert flat["layers/*/o_proj"] == P(MODEL, None, None)
    assert flat["layers/*/mlp/gate_proj"] == P(None, MODEL)
    assert flat["layers/*/mlp/down_proj"] == P(MODEL, None)
    assert flat["layers/*/k_proj"] == P(None, None, None)  # 4 kv heads over 8: replicated
    assert flat["swiftkv/k_proj"] == P(None, None, None, None)
    assert flat["norm/weight"] == P(None)
    messages = sorted(str(c.message) for c in caught)
    assert any("layers/*/k_proj" in m and "model=8" in m for m in messages), messages
    assert any("swiftkv/v_proj" in m for m in messages), messages
    # Over model=4 nothing falls back.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = sh.param_specs(w, {DATA: 2, MODEL: 4})
    assert specs["swiftkv"]["k_proj"] == P(None, None, MODEL, None)


def test_memory_per_device():
    big = sk.ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128)
    one = sh.memory_per_device(big, "1x1")
    assert 15.9e9 < one["params"] < 16.1e9  # Llama-3.1-8B in bf16
    assert one["cache"] == 2 * 32 * 8 * 128 * 2 * 8 * 8192  # 8 rows x 8192 tokens
    tp = sh.memory_per_device(big, "1x8")
    assert tp["params"] < one["params"] / 7 and tp["cache"] == one["cache"] // 8
    dp = sh.memory_per_device(big, "8x1")
    assert dp["params"] == one["params"] and dp["cache"] == one["cache"]  # pool replicated
    assert sh.memory_per_device(big, "8x1", pool_over_data=True)["cache"] == one["cache"] // 8
    swift = sh.memory_per_device(big.replace(num_key_value_layers=16), "1x1")
    assert swift["cache"] == one["cache"]  # g = 1: 16 + 16 slots, as many as the base model
    # Above L, q_proj_swiftkv and the stacked K/V replace q/k/v_proj; plus norm_swiftkv.
    assert swift["params"] == one["params"] + 4096 * 2
    swift2 = sh.memory_per_device(big.replace(num_key_value_layers=16, key_value_group_size=2), "1x1")
    assert swift2["cache"] == one["cache"] * 24 // 32


def test_load_checkpoint_takes_a_mesh_and_a_pytree_of_shardings(tmp_path):
    params = sk.init_params(PLAIN, jax.random.PRNGKey(1))
    sk.save_checkpoint(params, tmp_path / "ck")
    mesh = sh.make_mesh("1x1")
    for sharding in (mesh, sh.params_shardings(params.weights, mesh)):
        restored = sk.load_checkpoint(tmp_path / "ck", sharding=sharding)
        leaf = restored.weights["layers"][0]["q_proj"]
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
        jax.tree.map(np.testing.assert_array_equal, restored.weights, params.weights)
    loaded, _ = sk.load(tmp_path / "ck", tokenizer=False, mesh=mesh)
    assert isinstance(loaded.weights["embed_tokens"].sharding, jax.sharding.NamedSharding)
    cache = sk.init_cache(loaded, 2, 32)  # on the params' mesh by default
    assert cache.k[0].sharding.mesh == mesh and cache.lengths.sharding.mesh == mesh
    out, _ = sk.generate(loaded, cache, [[1, 2, 3], [4]], max_new_tokens=2)
    assert out == sk.generate(params, None, [[1, 2, 3], [4]], max_new_tokens=2)[0]


# -- 8 devices, in a subprocess -----------------------------------------------------------------

def _run_worker(mode: str, timeout: int = 600, env: dict | None = None, args: tuple = ()) -> dict:
    env = dict(os.environ, **(env or {}))
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, __file__, mode, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    return _run_worker("checks", args=(str(tmp_path_factory.mktemp("ck")),))


@pytest.mark.parametrize("model,mesh", [(m, spec) for m, specs in MESHES.items() for spec in specs])
def test_sharded_generate_equals_one_device(eight_devices, model, mesh):
    r = eight_devices[model][mesh]
    assert r["tokens"] == eight_devices[model]["reference"]["tokens"]
    assert r["tokens_again"] == eight_devices[model]["reference"]["tokens_again"]  # prefix-cache hits
    assert r["hit_tokens"] == eight_devices[model]["reference"]["hit_tokens"] > 0
    assert r["logits_rel_err"] <= 1e-4
    assert r["shards"]["estimate_matches"] == [True, True]  # memory_per_device vs real shards


def test_arrays_are_really_sharded(eight_devices):
    shapes = eight_devices["swiftkv"]["2x4"]["shards"]
    # q_proj [64, 8, 8] over model=4 -> [64, 2, 8] per device; MLP width 64 -> 16; vocab 256 -> 64.
    assert shapes["q_proj_swiftkv"] == {"spec": [None, MODEL, None], "shard": [64, 2, 8]}
    assert shapes["gate_proj"] == {"spec": [None, MODEL], "shard": [64, 16]}
    assert shapes["down_proj"] == {"spec": [MODEL, None], "shard": [16, 64]}
    assert shapes["embed_tokens"] == {"spec": [MODEL, None], "shard": [64, 64]}
    assert shapes["swiftkv_k_proj"] == {"spec": [None, None, MODEL, None], "shard": [1, 64, 1, 8]}
    # Cache pool [4 kv heads, slots, 8] -> one kv head per device, also after generate.
    assert shapes["pool"]["shard"][0] == 1 and shapes["pool_after"]["shard"][0] == 1
    assert shapes["block_table"]["spec"][0] == DATA and shapes["block_table"]["shard"][0] == 4
    plain = eight_devices["plain"]["1x8"]["shards"]
    assert plain["pool"]["shard"][0] == 1 and plain["k_proj"]["shard"] == [64, 1, 8]
    assert eight_devices["plain"]["8x1"]["shards"]["block_table"]["shard"][0] == 1
    # Fallback: 4 kv heads over model=8 warned and replicated, not an XLA error.
    assert any("k_proj" in w for w in eight_devices["swiftkv"]["1x8"]["warnings"])
    assert eight_devices["swiftkv"]["1x8"]["shards"]["pool"]["shard"][0] == 4


def test_pool_split_over_data_gives_the_same_tokens(eight_devices):
    r = eight_devices["pool_over_data"]
    assert r["pool"] == {"spec": [MODEL, DATA, None], "shard": [2, 160, 8]}
    assert r["tokens"] == r["reference"]


def test_checkpoint_from_2x4_restores_on_8x1_and_one_device(eight_devices):
    r = eight_devices["checkpoint"]
    assert r["equal_8x1"] and r["equal_one"]
    assert r["spec_8x1"] == [None, None, None]  # model=1: replicated on the 8x1 mesh
    assert r["spec_2x4"] == [None, MODEL, None]


def test_sharded_distillation_step_equals_unsharded(eight_devices):
    """Gradients within float32 reordering noise of one device; Adam updates equal in units of the
    learning rate (tests/numerics.py); also after a save on 2x4 and a restore onto 8x1."""
    from numerics import reorder_tolerance, updates_agree
    r = eight_devices["distill"]
    tol = reorder_tolerance(r["grad_terms"])
    assert max(r["grad_errors"].values()) <= tol, (tol, r["grad_errors"])
    assert abs(r["loss_sharded"] - r["loss"]) <= tol * abs(r["loss"])
    assert updates_agree(r["two_steps"]), r["two_steps"]
    # Saved on 2x4, restored onto 8x1 (Adam moments included) and one more step there.
    assert r["restored_spec"] == {"spec": [None, None, None, None], "shard": [1, 64, 4, 8]}
    assert updates_agree(r["resumed"]), r["resumed"]


def test_distill_loop_on_a_mesh_resumes_on_another_like_a_straight_run(eight_devices):
    from numerics import updates_agree
    r = eight_devices["distill"]["loop"]
    assert r["resumed_from"] == 2
    assert r["first_spec"] == {"spec": [None, None, MODEL, None], "shard": [1, 64, 1, 8]}
    assert r["resumed_spec"]["shard"] == [1, 64, 4, 8]
    assert updates_agree(r["updates"]), r["updates"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_like_one(eight_devices):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(port), str(i)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, out[-3000:] + err[-6000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for out in outs:
        assert out["devices"] == 8 and out["local"] == 4
        assert out["tokens"] == eight_devices["plain"]["reference"]["tokens"]


# -- the worker (runs with 8 devices) -----------------------------------------------------------

def _shard_info(x: jax.Array) -> dict:
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    shapes = {tuple(s.data.shape) for s in x.addressable_shards}
    assert len(shapes) == 1, shapes
    return {"spec": spec, "shard": list(shapes.pop())}


def _compile_cache() -> None:
    from swiftkv_jax.compile_cache import share_compilation_cache
    share_compilation_cache(ROOT / ".jax_cache", min_compile_time_s=0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _params(config, seed: int) -> sk.Params:
    """Random weights with std 0.1 (not 0.02), so greedy answers vary instead of echoing."""
    p = sk.init_params(config, jax.random.PRNGKey(seed))
    scale = lambda path, x: x if "norm" in sh.path_name(path) else 5 * x
    return sk.Params(jax.tree_util.tree_map_with_path(scale, p.weights), config)


def _prefill_logits(params, cache) -> np.ndarray:
    from swiftkv_jax.runtime.generation import prefill
    tokens = np.zeros((len(PROMPTS), 16), np.int32)
    for i, row in enumerate(PROMPTS):
        tokens[i, :len(row)] = row
    lengths = np.asarray([len(r) for r in PROMPTS], np.int32)
    logits, _ = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths))
    return np.asarray(logits)


def _generate_twice(params, mesh) -> dict:
    new_cache = lambda: sk.init_cache(params, len(PROMPTS), 32, block_size=8, num_blocks=40,
                                     mesh=mesh)
    logits = _prefill_logits(params, new_cache())
    cache = new_cache()
    tokens, cache = sk.generate(params, cache, PROMPTS, max_new_tokens=4)
    # Prompts that extend the first answers: their first block comes from the prefix cache.
    again = [p + t + [3] * (12 - len(p) - len(t)) for p, t in zip(PROMPTS, tokens)]
    timings = {}
    tokens_again, cache = sk.generate(params, cache, again, max_new_tokens=3, timings=timings)
    return dict(logits=logits, tokens=tokens, tokens_again=tokens_again,
                hit_tokens=timings["cached_tokens"], cache=cache)


def _checks(folder: str) -> dict:
    _compile_cache()
    assert jax.device_count() == 8, jax.devices()
    out: dict = {}
    for name, config in (("plain", PLAIN), ("swiftkv", SWIFT)):
        params = _params(config, 0)
        ref = _generate_twice(params, None)
        out[name] = {"reference": {k: ref[k] for k in ("tokens", "tokens_again", "hit_tokens")}}
        for spec in MESHES[name]:
            mesh = sh.make_mesh(spec)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sharded = sh.shard_params(params, mesh)
                cache = sk.init_cache(sharded, len(PROMPTS), 32, block_size=8, num_blocks=40,
                                      mesh=mesh)
            got = _generate_twice(sharded, mesh)
            w = sharded.weights
            layer = w["layers"][-1]
            shards = {"q_proj": _shard_info(layer.get("q_proj_swiftkv", layer["q_proj"])),
                      "k_proj": _shard_info(w["layers"][0]["k_proj"]),
                      "gate_proj": _shard_info(layer["mlp"]["gate_proj"]),
                      "down_proj": _shard_info(layer["mlp"]["down_proj"]),
                      "embed_tokens": _shard_info(w["embed_tokens"]),
                      "pool": _shard_info(cache.k[0]), "pool_after": _shard_info(got["cache"].k[-1]),
                      "block_table": _shard_info(cache.block_table)}
            if config.swiftkv:
                shards["q_proj_swiftkv"] = shards["q_proj"]
                shards["swiftkv_k_proj"] = _shard_info(w["swiftkv"]["k_proj"])
            # The config-only estimate equals the bytes really held by device 0.
            est = sh.memory_per_device(config, spec, jnp.float32, batch_size=8, max_length=40,
                                       teacher=True)
            held = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
            shards["estimate_matches"] = [est["params"] == held(w), est["cache"] == held(cache.k + cache.v)]
            err = np.abs(got["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max()
            out[name][spec] = {"tokens": got["tokens"], "tokens_again": got["tokens_again"],
                               "hit_tokens": got["hit_tokens"], "logits_rel_err": float(err),
                               "shards": shards, "warnings": [str(c.message) for c in caught]}
        if name == "plain":  # the pool's slots split over "data" too (memory over communication)
            mesh = sh.make_mesh("2x4")
            sharded = sh.shard_params(params, mesh)
            cache = sk.init_cache(sharded, len(PROMPTS), 32, block_size=8, num_blocks=40, mesh=mesh,
                                  pool_over_data=True)
            pool = _shard_info(cache.k[0])
            tokens, cache = sk.generate(sharded, cache, PROMPTS, max_new_tokens=4)
            out["pool_over_data"] = {"tokens": tokens, "reference": ref["tokens"], "pool": pool}
    out["checkpoint"] = _checkpoint_check(Path(folder))
    out["distill"] = _distill_check(Path(folder))
    return out


def _checkpoint_check(folder: Path) -> dict:
    params = sk.init_params(PLAIN, jax.random.PRNGKey(2))
    on_2x4 = sh.shard_params(params, sh.make_mesh("2x4"))
    sk.save_checkpoint(on_2x4, folder / "ck")
    on_8x1 = sk.load_checkpoint(folder / "ck", sharding=sh.make_mesh("8x1"))
    on_one = sk.load_checkpoint(folder / "ck")
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a.weights, b.weights)))
    q = lambda p: _shard_info(p.weights["layers"][0]["q_proj"])["spec"]
    assert len(on_one.weights["embed_tokens"].devices()) == 1
    return {"equal_8x1": same(on_8x1, params), "equal_one": same(on_one, params),
            "spec_8x1": q(on_8x1), "spec_2x4": q(on_2x4)}


def _lr_total(config, steps: int) -> float:
    from swiftkv_jax.train import distill as ds
    schedule = ds.make_schedule(config, config.max_steps)
    return float(sum(schedule(s) for s in range(steps)))


def _distill_check(folder: Path) -> dict:
    """Gradients on a 2x4 mesh against one device (before the optimizer), then Adam steps there,
    a save on 2x4, a restore onto 8x1 and a step more, as updates in units of the learning rate
    (tests/numerics.py says why each comparison is made as it is)."""
    from numerics import relative_norm_error, update_agreement

    from swiftkv_jax.train import distill as ds
    params = _params(SWIFT, 3)
    config = ds.DistillConfig(batch_size=8, seq_len=8, max_steps=4, learning_rate=1e-3)
    optimizer = ds.make_optimizer(config, 4)
    step = ds.make_train_step(config, optimizer)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, SWIFT.vocab_size, (1, 8, 8)).astype(np.int32),
             "weights": (rng.random((1, 8, 8)) > 0.2).astype(np.float32)}
    mesh = sh.make_mesh("2x4")
    sharded = sh.shard_params(params, mesh)
    on_mesh = lambda b, m=mesh: sh.shard_batch(b, m, batch_axis=1)
    grad_fn = jax.jit(jax.value_and_grad(lambda t, p, b: ds.distill_loss(
        t, p, jax.tree.map(lambda x: x[0], b), config)[0]))
    loss, grads = grad_fn(ds.trainable_of(params), params, jax.tree.map(jnp.asarray, batch))
    s_loss, s_grads = grad_fn(ds.trainable_of(sharded), sharded, on_mesh(batch))
    # The longest float32 sums behind a gradient: over the batch's 64 tokens times the vocabulary
    # (the softmax) or the hidden size, whichever is wider.
    terms = 64 * max(SWIFT.vocab_size, SWIFT.hidden_size, SWIFT.intermediate_size)
    grad_errors = {k: relative_norm_error(s_grads[k], grads[k]) for k in grads}

    start = ds.init_state(params, optimizer)["trainable"]
    state = ds.init_state(params, optimizer)
    for _ in range(2):  # step 0 has learning rate 0 (warm-up): the second one moves the weights
        state, _ = step(state, params, jax.tree.map(jnp.asarray, batch))
    s_state = ds.init_state(sharded, optimizer)
    for _ in range(2):
        s_state, _ = step(s_state, sharded, on_mesh(batch))
    assert _shard_info(s_state["trainable"]["swiftkv/k_proj"])["spec"] == [None, None, MODEL, None]
    two_steps = update_agreement(start, s_state["trainable"], state["trainable"], _lr_total(config, 2))
    # The sharded state, saved on 2x4, restored onto 8x1 and trained one more step there, against
    # the unsharded run's third step.
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / "state", s_state)
    mesh8 = sh.make_mesh("8x1")
    with ocp.StandardCheckpointer() as ckpt:
        r_state = ckpt.restore(folder / "state", sh.restore_target(
            s_state, sh.train_state_shardings(s_state, mesh8)))
    restored_spec = _shard_info(r_state["opt_state"][1][0].mu["swiftkv/k_proj"])
    r_state, _ = step(r_state, sh.shard_params(params, mesh8), on_mesh(batch, mesh8))
    state, _ = step(state, params, jax.tree.map(jnp.asarray, batch))
    resumed = update_agreement(start, r_state["trainable"], state["trainable"], _lr_total(config, 3))
    return {"loss": float(loss), "loss_sharded": float(s_loss), "grad_errors": grad_errors,
            "grad_terms": terms, "two_steps": two_steps, "resumed": resumed,
            "restored_spec": restored_spec, "loop": _distill_loop_check(folder, params)}


def _distill_loop_check(folder: Path, params: sk.Params) -> dict:
    """distill() itself: 2 steps on a 2x4 mesh, interrupted, resumed on 8x1 for 2 more, against
    4 straight steps on one device."""
    from numerics import update_agreement

    from swiftkv_jax.train import distill as ds
    from swiftkv_jax.train.data import Packed
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SWIFT.vocab_size, (16, 9)).astype(np.int32)
    packed = Packed(tokens[:, :-1], tokens[:, 1:], np.ones((16, 8), np.float32))
    config = ds.DistillConfig(batch_size=8, seq_len=8, max_steps=4, learning_rate=1e-3)
    run = lambda out, **kw: ds.distill(params, packed, config, folder / out, save_every=2,
                                       progress=False, **kw)
    straight = run("straight")
    first = run("meshes", mesh=sh.make_mesh("2x4"), stop_after=2)
    resumed = run("meshes", mesh=sh.make_mesh("8x1"), resume=True)
    trained = lambda r: ds.trainable_of(r.params)
    return {"updates": update_agreement(ds.trainable_of(params), trained(resumed), trained(straight),
                                        _lr_total(config, 4)),
            "resumed_from": resumed.resumed_from,
            "first_spec": _shard_info(first.params.weights["swiftkv"]["k_proj"]),
            "resumed_spec": _shard_info(resumed.params.weights["swiftkv"]["k_proj"])}


def _multihost(port: str, process_id: str) -> dict:
    sh.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    _compile_cache()
    params = _params(PLAIN, 0)  # same seed: same weights in every process
    mesh = sh.make_mesh("data=2,model=4")
    sharded = sh.shard_params(params, mesh)
    cache = sk.init_cache(sharded, len(PROMPTS), 32, num_blocks=40, mesh=mesh)
    tokens, _ = sk.generate(sharded, cache, PROMPTS, max_new_tokens=4)
    return {"devices": jax.device_count(), "local": jax.local_device_count(), "tokens": tokens}


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    result = {"checks": _checks, "multihost": _multihost}[mode](*rest)
    print(json.dumps(result, default=lambda x: np.asarray(x).tolist()))
