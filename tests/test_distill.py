"""Distillation on tiny random models: the loss falls, only the SwiftKV weights move and have
optimizer state, interrupt + resume equals a straight run, the gradient matches finite
differences, accumulation equals a bigger batch, and bad runs are refused (API and CLI)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_hf_llama
from numerics import update_agreement, updates_agree
from tiny_tokenizer import make_tokenizer

import swiftkv_jax as sk
from swiftkv_jax.cli import main
from swiftkv_jax.config import ConfigError, ModelConfig
from swiftkv_jax.model.attention import ATTENTION_TILE
from swiftkv_jax.train import distill as D
from swiftkv_jax.train.data import Packed
from swiftkv_jax.train.evaluate import evaluate
from swiftkv_jax.train.head_kl import head_kl

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=5, num_heads=4,
                  num_kv_heads=2, head_dim=8, eos_token_ids=(2,))


def tiny_swiftkv(L: int = 1, g: int = 2, cfg: ModelConfig = CFG) -> sk.Params:
    """A random model whose teacher and student differ clearly (std 0.1 weights, not 0.02; random
    q/k/v biases where the config has them)."""
    base = sk.init_params(cfg, jax.random.PRNGKey(0))
    weights = jax.tree.map(lambda x: 5 * x if x.ndim >= 2 else x, base.weights)
    rng = np.random.default_rng(1)
    for layer in weights["layers"]:
        for name in ("q_bias", "k_bias", "v_bias"):
            if name in layer:
                layer[name] = jnp.asarray(0.5 * rng.standard_normal(layer[name].shape), jnp.float32)
    return sk.to_swiftkv(sk.Params(weights, cfg), L, g)


def random_data(rows: int = 12, seq_len: int = 16, seed: int = 0) -> Packed:
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (rows, seq_len + 1)).astype(np.int32)
    weights = np.ones((rows, seq_len), np.float32)
    weights[:, :3] = 0  # some unsupervised positions, as a prompt would be
    return Packed(tokens[:, :-1], tokens[:, 1:], weights)


def config(**kw) -> D.DistillConfig:
    return D.DistillConfig(**dict(dict(learning_rate=1e-2, batch_size=2, seq_len=16, max_steps=8), **kw))


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def trainable_paths(params: sk.Params) -> set[str]:
    L = params.config.num_key_value_layers
    return ({"['swiftkv']"} | {f"['layers'][{i}]['q_proj_swiftkv']" for i in range(L, CFG.num_layers)})


def path_str(path) -> str:
    return jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    params, data = tiny_swiftkv(), random_data()
    run = D.distill(params, data, config(), tmp_path_factory.mktemp("run") / "out", save_every=3,
                    progress=False)
    return params, data, run


def test_loss_decreases(trained):
    params, data, run = trained
    batch = jax.tree.map(jnp.asarray, data.rows(np.arange(data.num_rows)))
    before, _ = D.distill_loss(D.trainable_of(params), params, batch, config())
    after, _ = D.distill_loss(D.trainable_of(run.params), params, batch, config())
    assert float(after) < 0.7 * float(before)
    assert evaluate(run.params, data)["kl"] < 0.7 * evaluate(params, data)["kl"]


def test_only_swiftkv_params_move_and_frozen_are_bit_identical(trained):
    params, _, run = trained
    before = dict(jax.tree_util.tree_flatten_with_path(params.weights)[0])
    after = dict(jax.tree_util.tree_flatten_with_path(run.params.weights)[0])
    assert before.keys() == after.keys()
    moved = {path_str(p) for p in before if not np.array_equal(before[p], after[p])}
    expected = {path_str(p) for p in before
                if any(path_str(p).startswith(t) for t in trainable_paths(params))}
    assert moved == expected and len(expected) == 3 + CFG.num_layers - 1  # norm, k, v; one q per upper layer
    frozen = [p for p in before if path_str(p) not in expected]
    assert all(before[p].dtype == after[p].dtype and np.array_equal(before[p], after[p]) for p in frozen)


def test_optimizer_state_exists_only_for_trainable_params():
    params = tiny_swiftkv()
    optimizer = D.make_optimizer(config(), 10)
    state = D.init_state(params, optimizer)
    trainable = D.trainable_of(params)
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        assert jax.tree.structure(moment) == jax.tree.structure(trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_state = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    assert n_state <= 2 * n_trainable + 4  # two moments plus scalar counts; nothing for frozen weights
    assert n_trainable < params.num_parameters() / 4


def test_bfloat16_params_train_float32_masters(tmp_path):
    """bf16 weights (the GPU/TPU default) keep float32 SwiftKV masters and Adam moments, so updates
    below bf16's resolution add up instead of rounding away; the result comes back in bf16."""
    params = tiny_swiftkv().astype(jnp.bfloat16)
    cfg = config(learning_rate=1e-6)
    optimizer = D.make_optimizer(cfg, 8)
    state = D.init_state(params, optimizer)
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
    start = np.asarray(state["trainable"]["swiftkv/k_proj"], np.float32)
    step = D.make_train_step(cfg, optimizer)
    data = random_data()
    for s in range(8):
        state, _ = step(state, params, jax.tree.map(jnp.asarray, data.rows(D.batch_indices(s, data.num_rows, cfg))))
    # Adam moves every weight by ~1e-6 a step: far below bf16's spacing (~4e-4 at these weights'
    # size), so bf16 masters would not move at all.
    assert (np.asarray(state["trainable"]["swiftkv/k_proj"]) != start).mean() > 0.9
    run = D.distill(params, data, config(max_steps=2), tmp_path / "run", progress=False)
    assert run.params.weights["swiftkv"]["k_proj"].dtype == jnp.bfloat16


def test_interrupt_and_resume_equals_a_straight_run(tmp_path):
    params, data, cfg = tiny_swiftkv(), random_data(), config(max_steps=7)
    straight = D.distill(params, data, cfg, tmp_path / "a", save_every=2, progress=False)
    first = D.distill(params, data, cfg, tmp_path / "b", save_every=2, stop_after=5, progress=False)
    assert first.steps == 5  # killed after step 5: the newest checkpoint is step 4
    with pytest.raises(D.RunError, match="--resume"):
        D.distill(params, data, cfg, tmp_path / "b", save_every=2, progress=False)
    resumed = D.distill(params, data, cfg, tmp_path / "b", save_every=2, resume=True, progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 7
    for x, y in zip(jax.tree.leaves(straight.params.weights), jax.tree.leaves(resumed.params.weights)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 8))
    losses = lambda f: [json.loads(ln)["loss"] for ln in f.read_text().splitlines()]
    np.testing.assert_allclose(losses(tmp_path / "a" / "metrics.jsonl"), losses(tmp_path / "b" / "metrics.jsonl"), rtol=1e-5)
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["6", "7"]  # keep 2


@pytest.mark.parametrize("chunk", [7, 64, 500])
def test_fused_head_kl_equals_the_plain_formula_and_its_gradient(chunk):
    """head_kl (LM head fused, chunked, hand-written backward) against the KL written plainly over
    full logits and differentiated by JAX; N = 100 is no multiple of 7 or 64 (padding)."""
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    n, d, v, tau = 100, 16, 50, 2.0
    x_t, x_s = jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (n, d))
    head = 0.5 * jax.random.normal(k[2], (v, d))
    w = (jax.random.uniform(k[3], (n,)) > 0.3).astype(jnp.float32).at[:20].set(0.0)  # skipped chunks

    def plain(xs):
        t = jax.nn.log_softmax(x_t @ head.T / tau, axis=-1)
        s = jax.nn.log_softmax(xs @ head.T / tau, axis=-1)
        return tau**2 * jnp.sum(w * jnp.sum(jnp.exp(t) * (t - s), axis=-1))

    fused = lambda xs: head_kl(x_t, xs, w, head, tau, chunk)
    np.testing.assert_allclose(float(fused(x_s)), float(plain(x_s)), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(fused)(x_s), jax.grad(plain)(x_s), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(jax.grad(fused)(x_s)).max()) > 1e-3  # a gradient that can be wrong


@pytest.mark.parametrize("seq_len", [16, ATTENTION_TILE + 8], ids=["dense", "tiled"])
def test_gradient_matches_finite_differences(seq_len):
    params, data = tiny_swiftkv(L=2, g=3), random_data(rows=2, seq_len=seq_len)
    batch = jax.tree.map(jnp.asarray, data.rows(np.arange(2)))
    cfg = config()
    trainable = D.trainable_of(params)
    # Jitted once: each finite-difference evaluation reuses the compiled loss (op by op, the tiled
    # attention's loops made this test take a minute).
    loss = jax.jit(lambda t: D.distill_loss(t, params, batch, cfg)[0])
    grads = jax.jit(jax.grad(lambda t: D.distill_loss(t, params, batch, cfg)[0]))(trainable)
    for name in ("swiftkv/k_proj", "swiftkv/norm/weight"):
        g = grads[name]
        # Directional derivative along the gradient of this one weight: d/da L(w + a g) = |g|^2.
        shifted = lambda a: loss(dict(trainable, **{name: trainable[name] + a * g}))
        eps = 1e-2 / float(jnp.linalg.norm(g))
        fd = (float(shifted(eps)) - float(shifted(-eps))) / (2 * eps)
        np.testing.assert_allclose(fd, float(jnp.sum(g * g)), rtol=2e-2)
    # and one single element of a q_proj_swiftkv, the one with the largest gradient
    gq = grads["layers/*/q_proj_swiftkv"][1]
    idx = np.unravel_index(int(jnp.argmax(jnp.abs(gq))), gq.shape)
    eps = 1e-2
    bump = lambda a: loss(dict(trainable, **{"layers/*/q_proj_swiftkv": [
        q.at[idx].add(a) if i == 1 else q for i, q in enumerate(trainable["layers/*/q_proj_swiftkv"])]}))
    fd = (float(bump(eps)) - float(bump(-eps))) / (2 * eps)
    np.testing.assert_allclose(fd, float(gq[idx]), rtol=2e-2)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    params, data = tiny_swiftkv(), random_data()
    big = D.distill(params, data, config(batch_size=4, max_steps=3), tmp_path / "big", progress=False)
    acc = D.distill(params, data, config(batch_size=2, grad_accum=2, max_steps=3), tmp_path / "acc",
                    progress=False)
    # Accumulation reorders the float32 sums: compared as Adam updates in units of the learning
    # rate (tests/numerics.py), not elementwise, where a near-zero gradient's sign is rounding.
    schedule = D.make_schedule(config(), 3)
    report = update_agreement(D.trainable_of(params), D.trainable_of(acc.params),
                              D.trainable_of(big.params), float(sum(schedule(s) for s in range(3))))
    assert updates_agree(report), report


def test_data_order_depends_on_the_step_alone():
    cfg = config(batch_size=3, grad_accum=2)
    epoch = np.concatenate([D.batch_indices(s, 12, cfg).ravel() for s in range(2)])
    assert sorted(epoch) == list(range(12))  # one epoch visits every row once
    assert not np.array_equal(D.batch_indices(2, 12, cfg), D.batch_indices(0, 12, cfg))  # reshuffled
    np.testing.assert_array_equal(D.batch_indices(5, 12, cfg), D.batch_indices(5, 12, cfg))


def test_schedule_warms_up_then_decays():
    s = D.make_schedule(D.DistillConfig(learning_rate=1e-3), 100)
    assert float(s(0)) == 0 and float(s(5)) == pytest.approx(1e-3) and float(s(100)) == 0
    assert float(s(2)) < float(s(4)) and float(s(50)) > float(s(80))


def test_output_folder_holding_another_run_is_refused(tmp_path):
    params, data = tiny_swiftkv(), random_data()
    D.distill(params, data, config(max_steps=2), tmp_path / "out", progress=False)
    for kw in ({}, {"resume": True}):
        with pytest.raises(D.RunError, match="holds a different run .*learning_rate"):
            D.distill(params, data, config(max_steps=2, learning_rate=1e-3), tmp_path / "out",
                      progress=False, **kw)
    run = D.distill(params, data, config(max_steps=2, learning_rate=1e-3), tmp_path / "out",
                    progress=False, overwrite=True)
    assert run.steps == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(D.RunError, match="holds no distillation run"):
        D.distill(params, data, config(max_steps=2), tmp_path / "other", progress=False)


def test_bad_batch_shapes_are_refused():
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        D.DistillConfig(seq_len=1)
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        D.DistillConfig(grad_accum=0)


def test_plain_llama_is_refused_by_the_trainer():
    with pytest.raises(ValueError, match="plain Llama"):
        D.trainable_of(sk.init_params(CFG, jax.random.PRNGKey(0)))


# --- the command line, end to end on a tiny HF model with a tokenizer -----------------------

CHATS = [{"messages": [{"role": "user", "content": f"how long is the {w} ?"},
                       {"role": "assistant", "content": f"the {w} is {v} long ."}]}
         for w in ("water", "word", "day", "number", "side", "time") for v in ("one", "two", "many")]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hf")
    make_hf_llama(folder, num_hidden_layers=4, initializer_range=0.1)
    make_tokenizer(folder)
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS * 3))
    return folder, data


def test_cli_distill_export_and_eval(tiny_hf, tmp_path, capsys):
    folder, data = tiny_hf
    args = ["distill", "--model", str(folder), "-L", "2", "-g", "2", "--data", str(data),
            "--seq-len", "32", "--batch-size", "2", "--lr", "5e-3", "--max-steps", "6",
            "--held-out-percent", "30", "--no-text-eval", "--answer-preview-tokens", "4",
            "--out", str(tmp_path / "run"), "--export-hf", str(tmp_path / "hf"), "--assistant-only",
            "--mesh", "1x1"]  # the sharded code path, on this one device
    assert main(args) == 0
    out = capsys.readouterr()
    assert "| init-only |" in out.out and "| distilled |" in out.out and "### " in out.out
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    res = summary["results"]
    assert res["distilled"]["held-out"]["kl"] < res["init-only"]["held-out"]["kl"]
    assert summary["steps"] == 6 and summary["tokens_seen"] == 6 * 2 * 32
    model, _ = sk.load(tmp_path / "run" / "model")
    hf, tok = sk.load(tmp_path / "hf", progress=False)
    assert tok is not None and leaves_equal(model.weights, hf.weights)
    assert (hf.config.num_key_value_layers, hf.config.key_value_group_size) == (2, 2)
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # same run again: refused
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data", str(data),
                 "--held-out-percent", "30", "--seq-len", "32", "--no-text-eval",
                 "--answer-preview-tokens", "4", "--json", str(tmp_path / "e.json"), "--mesh", "1x1"]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["results"]["model"]["held-out"]
    assert again["kl"] == pytest.approx(res["distilled"]["held-out"]["kl"], rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["-L", "4"], "leaves no SwiftKV layer"),
    (["-L", "9"], "leaves no SwiftKV layer"),
    (["-L", "1", "-g", "2"], "must divide"),
    (["-L", "0"], "num_key_value_layers must be in"),
])
def test_cli_refuses_l_and_g_that_do_not_fit(tiny_hf, tmp_path, capsys, flags, message):
    folder, data = tiny_hf
    assert main(["distill", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "o"),
                 *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_data_errors_are_one_line(tiny_hf, tmp_path, capsys):
    folder, _ = tiny_hf
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n{oops\n")
    base = ["distill", "--model", str(folder), "-L", "2", "--out", str(tmp_path / "o")]
    assert main(base + ["--data", str(bad)]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n"
                                 for i in range(30)))
    assert main(base + ["--data", str(no_answer), "--assistant-only"]) == 2
    assert "no assistant turn" in capsys.readouterr().err


def test_to_swiftkv_bad_group_size_is_a_config_error():
    with pytest.raises(ConfigError):
        sk.to_swiftkv(sk.init_params(CFG, jax.random.PRNGKey(0)), 2, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_least_squares_kv_init_fits_the_layers_own_keys_and_values(family):
    from swiftkv_jax.train.kv_init import fit_swiftkv_kv, layer_inputs

    biased = family == "qwen2"
    params = tiny_swiftkv(L=2, g=1, cfg=CFG.replace(family=family))
    data = random_data(rows=8, seq_len=16)
    fitted = fit_swiftkv_kv(params, data.tokens, ridge=1e-9)
    sw, layers = fitted.weights["swiftkv"], params.weights["layers"]
    # Layer L's own input is exactly s (norm_swiftkv starts as its input_layernorm): exact fit.
    np.testing.assert_allclose(sw["k_proj"][0], layers[2]["k_proj"], atol=1e-3)
    np.testing.assert_allclose(sw["v_proj"][0], layers[2]["v_proj"], atol=1e-3)
    if biased:
        np.testing.assert_allclose(sw["k_bias"][0], layers[2]["k_bias"], atol=1e-3)
        np.testing.assert_allclose(sw["v_bias"][0], layers[2]["v_bias"], atol=1e-3)
    s, xs = layer_inputs(params, jnp.asarray(data.tokens))
    bias = lambda p, j: p["k_bias"][j] if biased else 0.0
    for j in (1, 2):  # later layers: the fit explains their keys better than their own weights do
        target = jnp.einsum("btd,dkh->btkh", xs[j], layers[2 + j]["k_proj"]) + (
            layers[2 + j]["k_bias"] if biased else 0.0)
        err = lambda p: float(jnp.mean((jnp.einsum("btd,dkh->btkh", s, p["k_proj"][j]) + bias(p, j)
                                        - target) ** 2))
        assert err(sw) < 0.9 * err(params.weights["swiftkv"])
    assert evaluate(fitted, data)["kl"] < evaluate(params, data)["kl"]
    frozen = lambda p: {k: v for k, v in p.weights.items() if k != "swiftkv"}
    assert leaves_equal(frozen(fitted), frozen(params))
