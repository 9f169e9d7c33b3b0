"""The model as Flax NNX modules: the module tree holds exactly the schema's tensors (paths,
shapes, dtypes, logical axes), runs like transformers on the same weights, and trains with an
nnx.Optimizer on the parameters distillation trains, leaving the rest untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hf_logits, prompts, rel_err
from flax import nnx

import swiftkv_jax as sk
from swiftkv_jax.model.modules import MLP, DecoderLayer, DistilledParam, Llama, RMSNorm
from swiftkv_jax.model.params import tensors

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=5, num_heads=4,
            num_kv_heads=2, head_dim=8)
CONFIGS = {
    "plain": sk.ModelConfig(**BASE),
    "tied": sk.ModelConfig(**BASE, tie_word_embeddings=True),
    "swiftkv_g1": sk.ModelConfig(**BASE, num_key_value_layers=2),
    "swiftkv_g3": sk.ModelConfig(**BASE, num_key_value_layers=2, key_value_group_size=3),
    "qwen2_swiftkv": sk.ModelConfig(**BASE, family="qwen2", num_key_value_layers=3),
    "qwen3": sk.ModelConfig(**BASE, family="qwen3"),
}


def _variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """Every variable of the module tree by its path."""
    return {tuple(path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_module_tree_holds_exactly_the_schemas_tensors(name):
    cfg = CONFIGS[name]
    model = Llama(cfg, rngs=nnx.Rngs(0))
    found = _variables(model)
    want = {t.path: t for t in tensors(cfg)}
    assert set(found) == set(want)  # nothing missing, nothing extra
    for path, t in want.items():
        v = found[path]
        assert v.shape == t.shape and v.dtype == jnp.float32, path
        assert v.get_metadata()["out_sharding"] == t.kind.axes, path  # logical axes, from the schema
        assert isinstance(v, DistilledParam) == t.kind.trainable, path
    assert isinstance(model.layers[0], DecoderLayer) and isinstance(model.layers[0].mlp, MLP)
    assert isinstance(model.norm, RMSNorm) and hasattr(model, "lm_head") != cfg.tie_word_embeddings
    # The state is the Params pytree the rest of the library takes, leaf for leaf.
    ref = sk.init_params(cfg, jax.random.PRNGKey(1))
    assert jax.tree.structure(model.params.weights) == jax.tree.structure(ref.weights)


def test_a_module_built_from_the_wrong_shapes_is_refused():
    params = sk.init_params(CONFIGS["plain"], jax.random.PRNGKey(0))
    params.weights["layers"][1]["mlp"]["up_proj"] = jnp.zeros((32, 47))
    with pytest.raises(ValueError, match="layers/1/mlp/up_proj has shape"):
        Llama.from_params(params)


def test_the_modules_answer_like_transformers(gqa_model):
    folder, hf = gqa_model
    params, _ = sk.load(folder, progress=False)
    model = Llama.from_params(params)
    assert model.embed_tokens[...] is params.weights["embed_tokens"]  # wrapped, not copied
    ids = prompts(params.config.vocab_size, [30, 30], seed=4)
    logits, _ = model(None, jnp.asarray(ids), all_logits=True)
    assert rel_err(logits, hf_logits(hf, ids)) <= 1e-4
    # One module applied alone: the last norm, against the same formula in numpy.
    h = np.random.default_rng(0).normal(size=(2, 3, params.config.hidden_size)).astype(np.float32)
    w = np.asarray(params.weights["norm"]["weight"])
    want = h / np.sqrt((h * h).mean(-1, keepdims=True) + params.config.rms_norm_eps) * w
    assert rel_err(model.norm(jnp.asarray(h)), want) <= 1e-5


def test_an_nnx_optimizer_trains_the_distilled_parameters_only():
    model = Llama(CONFIGS["swiftkv_g1"], rngs=nnx.Rngs(0))
    values = {p: (np.asarray(v[...]), isinstance(v, DistilledParam)) for p, v in _variables(model).items()}
    frozen = {p: x for p, (x, distilled) in values.items() if not distilled}
    trained = {p: x for p, (x, distilled) in values.items() if distilled}
    tokens = jnp.asarray(prompts(64, [24], seed=5))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=DistilledParam)

    def loss(m: Llama) -> jax.Array:
        logits, _ = m(None, tokens, all_logits=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    @nnx.jit
    def step(m: Llama, opt: nnx.Optimizer) -> jax.Array:
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, DistilledParam))(m)
        opt.update(m, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05
    now = _variables(model)
    assert all(np.array_equal(np.asarray(now[p][...]), x) for p, x in frozen.items())
    assert all(not np.array_equal(np.asarray(now[p][...]), x) for p, x in trained.items())
    # The trained module is Params again for everything else (here: generate).
    out, _ = sk.generate(model.params, None, tokens[0, :5].tolist(), max_new_tokens=3, stop_ids=[])
    assert len(out) == 3
