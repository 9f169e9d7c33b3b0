"""int8 weights: the CPU kernel against a float64 NumPy product, quantisation against its NumPy
definition, an int8 model against transformers running the same (dequantised) weights, checkpoints,
sharding specs, and the errors a user gets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from conftest import TINY_CONFIGS, built_kernel, hf_greedy, hf_logits, make_hf_llama, prompts, rel_err

import swiftkv_jax as sk
from swiftkv_jax.config import ConfigError
from swiftkv_jax.io.weights import load_checkpoint, save_checkpoint, save_hf_folder
from swiftkv_jax.kernels import cpu as cpu_kernels
from swiftkv_jax.model import int8
from swiftkv_jax.model.params import KINDS, abstract_weights


def dequantised_f64(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """values [N, K] int8 * scales [N, K / B] per block of B inputs, in float64."""
    n, k = values.shape
    blocks = scales.shape[1]
    return (values.astype(np.float64).reshape(n, blocks, k // blocks) * scales[:, :, None]).reshape(n, k)


def rows_quantised_f64(x: np.ndarray, block: int = 32) -> np.ndarray:
    """x [R, K] as the VNNI path sees it: per block of 32 inputs, round(x * 127 / max|x|) (float32
    arithmetic, ties to even) times max|x| / 127, in float64."""
    r, k = x.shape
    blocks = x.reshape(r, k // block, block)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float32)).reshape(r, k)


# rows, inputs K, outputs N, scales per output
KERNEL_CASES = [
    (1, 576, 192, 18),   # decode at batch 1, SmolLM2's k_proj, blocks of 32 (the vector path)
    (2, 1536, 64, 48),   # two rows: the direct path's second variant
    (3, 64, 40, 2),      # three rows: weights dequantised to a scratch tile, then FMAs
    (8, 96, 13, 3),      # outputs not a multiple of the tile: scalar tail
    (16, 40, 8, 5),      # blocks of 8 inputs, the most rows the kernel takes
    (5, 36, 12, 3),      # blocks of 12 (not a multiple of 8) and K not a multiple of 8
    (4, 24, 7, 1),       # one scale per output
    (11, 128, 9, 2),     # blocks of 64; 8 + 3 rows, an odd number of outputs (VNNI: tails)
    (16, 192, 33, 1),    # one scale per output over 192 inputs (VNNI: 3 chunks of 64)
    (17, 64, 33, 2),     # the fewest rows of a prefill chunk (VNNI: the GEMM, one 32-output tile + 1)
    (40, 576, 192, 18),  # a chunk of 40 rows: 6 + ... + 4 (VNNI GEMM row blocks)
    (23, 128, 50, 1),    # one scale per output over 128 inputs, a partial last tile (VNNI GEMM)
]


@pytest.fixture(scope="module")
def target():
    return built_kernel(cpu_kernels.int8_matmul_target())


def vnni_applies(k: int, blocks: int) -> bool:
    return cpu_kernels.int8_vnni() and k % 64 == 0 and (k // blocks) % 32 == 0  # the C++'s own test


@pytest.mark.parametrize("path", ["best", "float", "scalar"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "r{}k{}n{}b{}".format(*c))
def test_kernel_matches_float64_reference(target, case, path):
    """Each path against float64 NumPy: the float ones against x @ dequantised(w).T; the VNNI one
    (path "best" where the CPU has it) against the same product of x quantised per 32 inputs, and
    within that quantisation's error of the float product."""
    rows, k, n, blocks = case
    rng = np.random.default_rng(rows * 1000 + k)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    x[0, :32] *= 20.0  # an outlier block: its own scale must not flatten the others
    values = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scales = rng.uniform(1e-3, 2e-2, (n, blocks)).astype(np.float32)
    got = np.asarray(cpu_kernels.int8_matmul(target, jnp.asarray(x), jnp.asarray(values), jnp.asarray(scales),
                                             path))
    w = dequantised_f64(values, scales)
    exact = x.astype(np.float64) @ w.T
    quantised = path == "best" and vnni_applies(k, blocks)
    want = rows_quantised_f64(x) @ w.T if quantised else exact
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    if quantised:  # and the activations' rounding (<= half a step a block) is all that moved it
        step = np.abs(x.reshape(rows, k // 32, 32)).max(-1) / 127
        bound = (np.repeat(step / 2, 32, axis=1) @ np.abs(w).T) * 1.001
        assert (np.abs(got - exact) <= bound).all()
        assert np.abs(got - exact).max() > 0  # it did quantise


@pytest.mark.parametrize("path", ["best", "float", "scalar"])
def test_one_call_for_several_weights(target, path):
    """q/k/v-like weights of different widths and blocks in one kernel call, each = its reference."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 128), dtype=np.float32)
    weights = [(rng.integers(-127, 128, (n, 128)).astype(np.int8),
                rng.uniform(1e-3, 2e-2, (n, b)).astype(np.float32)) for n, b in ((40, 4), (8, 1), (13, 2))]
    got = cpu_kernels.int8_matmuls(target, jnp.asarray(x), [tuple(map(jnp.asarray, w)) for w in weights],
                                   path)
    xs = rows_quantised_f64(x) if path == "best" and cpu_kernels.int8_vnni() else x.astype(np.float64)
    for y, (values, scales) in zip(got, weights, strict=True):
        want = xs @ dequantised_f64(values, scales).T
        np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_matmul_routes_to_the_kernel_and_equals_xla(target):
    """int8.matmul at decode rows takes the kernel (in the lowered program) and gives what the XLA
    path (dequantise, dot) gives on the rows the kernel sees (quantised per 32 on the VNNI path)."""
    rng = np.random.default_rng(1)
    w = int8.quantise(jnp.asarray(rng.standard_normal((64, 4, 8), np.float32)), (0,), 32)
    x = jnp.asarray(rng.standard_normal((2, 3, 64), np.float32))
    f = jax.jit(int8.matmul)
    assert cpu_kernels.INT8_MATMUL_TARGET in f.lower(x, w).as_text()
    seen = x
    if cpu_kernels.int8_vnni():
        seen = rows_quantised_f64(np.asarray(x).reshape(6, 64)).reshape(2, 3, 64)
    xla = jnp.einsum("btk,nk->btn", jnp.asarray(seen, jnp.float32),
                     np.asarray(int8._float_values(w, jnp.float32)).reshape(32, 64))
    np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(xla).reshape(2, 3, 4, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [32, 0, 48], ids=["block32", "per-output", "non-dividing"])
def test_quantise_follows_its_definition(block):
    """Per block of inputs: scale = max |w| / 127, value = round(w / scale); a block size that
    does not divide the inputs means one scale per output."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 3, 16), np.float32)  # a q_proj: inputs 64, outputs (3, 16)
    w[:32, 1, 5] = 0.0  # an all-zero block
    q = int8.quantise(jnp.asarray(w), (0,), block)
    b = 32 if block == 32 else 64
    rows = w.reshape(64, 48).T.reshape(48, 64 // b, b).astype(np.float64)  # [out, blocks, b]
    amax = np.abs(rows).max(-1)
    scale = np.where(amax > 0, amax / 127, 1.0)
    assert q.values.shape == (3, 16, 64) and q.values.dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(q.scales).reshape(48, -1), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.values).reshape(48, 64 // b, b),
                                  np.round(rows / scale[..., None]).astype(np.int8))
    back = np.asarray(int8.dequantise(q, (0,)))
    assert back.shape == w.shape
    err = np.abs(back - w).reshape(64 // b, b, 48).transpose(2, 0, 1)
    assert (err <= scale[..., None] / 2 + 1e-7).all()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> folder of tiny HF models, plain and (for two) their SwiftKV conversion."""
    out = {}
    for name in ("gqa_tied", "head_dim_24", "qwen2_mqa_head_dim_24", "qwen3_gqa"):
        folder = tmp_path_factory.mktemp(name)
        make_hf_llama(folder, **TINY_CONFIGS[name])
        out[name] = folder
    return out


def hf_model_of(params: sk.Params, folder) -> transformers.PreTrainedModel:
    """transformers' model of `params`' float weights (int8 ones written dequantised)."""
    save_hf_folder(params, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["gqa_tied", "head_dim_24", "qwen2_mqa_head_dim_24", "qwen3_gqa"])
def test_int8_model_equals_transformers_on_its_dequantised_weights(models, name, tmp_path, float_kernel_path):
    """The int8 model's logits are those of transformers running the dequantised weights (so the
    int8 path computes exactly that model), and its greedy tokens through the paged cache and the
    decode kernel (its float path) are transformers' greedy tokens; and it stays close to the float
    model."""
    params, _ = sk.load(models[name], tokenizer=False, quantize="int8")
    assert params.config.quantization == "int8"
    reference = hf_model_of(params, tmp_path / "dequantised")
    ids = prompts(params.config.vocab_size, [9, 9], seed=3)
    logits, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(logits, hf_logits(reference, ids)) < 1e-4
    out, _ = sk.generate(params, None, ids[0], max_new_tokens=8, stop_ids=[])
    assert out == hf_greedy(reference, ids[0], 8)
    float_params, _ = sk.load(models[name], tokenizer=False)
    float_logits, _ = sk.forward(float_params, None, jnp.asarray(ids), all_logits=True)
    assert 1e-5 < rel_err(logits, float_logits) < 0.1  # quantised, by little (tiny random weights)


def quantise_rows_torch(x):
    """rows_quantised_f64 in torch float32 (transformers' Linear inputs, as the VNNI path sees them)."""
    import torch
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / torch.where(amax > 0, amax, 1.0), 0.0)
    q = torch.clamp(torch.round(blocks * inv), -127, 127)
    return (q * (amax / 127.0)).reshape(x.shape)


@pytest.mark.parametrize("name", ["gqa_tied", "qwen3_gqa"])
def test_int8_decode_rows_on_the_vnni_path_equal_transformers_with_rows_quantised(models, name, tmp_path):
    """Where the kernel quantises decode rows (AVX-512 VNNI), the model computes exactly this:
    transformers on the dequantised weights with every Linear's input quantised per 32 inputs
    (forward pre-hooks). Teacher-forced through the paged cache: a 20-token chunk (the GEMM for
    prefill chunks), a 3-token one (the decode-row path), then one token a step; every step's
    logits = the hooked model's, and differ from the unhooked one's (so the rows really were
    quantised). Projections over 64k inputs take the VNNI path (the tiny models'
    q/k/v, o, gate/up and LM head), the others the float one (down_proj over 96)."""
    if not cpu_kernels.int8_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: decode rows take the float path (tested above)")
    params, _ = sk.load(models[name], tokenizer=False, quantize="int8")
    reference = hf_model_of(params, tmp_path / "dequantised")
    ids = prompts(params.config.vocab_size, [28], seed=4)[0]
    unhooked = hf_logits(reference, [ids])[0]
    for module in reference.modules():  # the kernel quantises x where K is a multiple of 64
        if module.__class__.__name__ == "Linear" and module.in_features % 64 == 0:
            module.register_forward_pre_hook(lambda _, args: (quantise_rows_torch(args[0]),))
    want = hf_logits(reference, [ids])[0]
    cache = sk.init_cache(params, 1, 32)
    logits, cache = sk.forward(params, cache, jnp.asarray([ids[:20]]), jnp.asarray([20]))  # 20 rows
    got = [logits[0]]
    logits, cache = sk.forward(params, cache, jnp.asarray([ids[20:23]]), jnp.asarray([3]))
    got.append(logits[0])
    for t in range(23, len(ids)):
        logits, cache = sk.forward(params, cache, jnp.asarray([[ids[t]]]), jnp.asarray([1]))
        got.append(logits[0])
    for t, row in zip([19, 22, *range(23, len(ids))], got, strict=True):
        assert rel_err(row, want[t]) < 1e-4, t
        assert rel_err(want[t], unhooked[t]) > 1e-3, t


def test_int8_swiftkv_model_equals_its_dequantised_self(models):
    """A SwiftKV model (L = 1 of 3, g = 2: the stacked group K/V) quantised: prefill + decode
    through the cache and the kernel = the forward of its dequantised float weights."""
    base, _ = sk.load(models["gqa_tied"], tokenizer=False)
    params = sk.to_swiftkv(base, 1, 2).quantize("int8", block=16)
    assert isinstance(params.weights["swiftkv"]["k_proj"], int8.Int8Weight)
    floats = params.dequantize()
    ids = prompts(params.config.vocab_size, [7, 12], seed=4)
    out, _ = sk.generate(params, None, ids, max_new_tokens=6, stop_ids=[])
    want, _ = sk.generate(floats, None, ids, max_new_tokens=6, stop_ids=[])
    assert out == want
    a, _ = sk.forward(params, None, jnp.asarray([ids[1]]))
    b, _ = sk.forward(floats, None, jnp.asarray([ids[1]]))
    assert rel_err(a, b) < 1e-4


def test_bytes_and_checkpoint_round_trip(models, tmp_path):
    """int8 params are about a quarter of the float bytes, save as int8 and load back bit for bit,
    also through load(); a float checkpoint loads quantised on request."""
    floats, _ = sk.load(models["gqa_tied"], tokenizer=False)
    params = floats.quantize("int8")
    assert params.nbytes() < 0.33 * floats.nbytes()
    assert params.num_parameters() == floats.num_parameters()
    save_checkpoint(params, tmp_path / "q")
    back = load_checkpoint(tmp_path / "q", dtype=jnp.float32)
    assert back.config == params.config
    for a, b in zip(jax.tree.leaves(params.weights), jax.tree.leaves(back.weights), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(params.weights) == jax.tree.structure(back.weights)
    loaded, _ = sk.load(tmp_path / "q", tokenizer=False)
    assert loaded.config.quantization == "int8"
    save_checkpoint(floats, tmp_path / "f")
    requantised, _ = sk.load(tmp_path / "f", tokenizer=False, quantize="int8")
    for a, b in zip(jax.tree.leaves(params.weights), jax.tree.leaves(requantised.weights)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_abstract_weights_memory_and_sharding_follow_the_schema():
    """The schema's int8 entries give abstract shapes equal to real quantised params, partition
    specs (an int8 q_proj [heads, head_dim, embed] splits over heads like the float one) and the
    memory estimate (int8 bytes, not the float dtype's)."""
    from swiftkv_jax.sharding.memory import memory_per_device
    from swiftkv_jax.sharding.partitioning import param_specs
    cfg = sk.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=16, num_key_value_layers=1, quantization="int8")
    params = sk.init_params(cfg.replace(quantization=None), jax.random.PRNGKey(0)).quantize("int8")
    abstract = abstract_weights(cfg, jnp.float32, teacher=True)
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
    assert shapes(abstract) == shapes(params.weights)
    specs = param_specs(params, {"data": 1, "model": 2})
    assert tuple(specs["layers"][0]["q_proj"].values) == ("model", None, None)
    assert tuple(specs["layers"][0]["o_proj"].values) == (None, "model", None)
    assert tuple(specs["layers"][0]["mlp"]["down_proj"].scales) == (None, None)
    assert tuple(specs["embed_tokens"].values) == ("model", None)
    assert KINDS["layers/*/q_proj/scales"].axes == ("heads", "head_dim", "quant_blocks")
    memory = memory_per_device(cfg, {"data": 1, "model": 2}, jnp.float32, teacher=True)
    assert memory["params_total"] == params.nbytes()
    assert memory["params"] < 0.6 * params.nbytes()  # the int8 values split over "model" too


def test_bad_requests_get_clear_errors(models):
    with pytest.raises(ConfigError, match="quantize must be one of .*'int3'"):
        sk.load(models["gqa_tied"], tokenizer=False, quantize="int3")
    params, _ = sk.load(models["gqa_tied"], tokenizer=False, quantize="int8")
    with pytest.raises(ValueError, match="already int8"):
        params.quantize("int8")
    with pytest.raises(ConfigError, match="convert float params to SwiftKV"):
        sk.to_swiftkv(params, 1)
    with pytest.raises(ValueError, match="NNX modules hold float weights"):
        sk.Llama.from_params(params)
    with pytest.raises(ConfigError, match="quantization must be one of"):
        params.config.replace(quantization="int4")
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported"):
        sk.ModelConfig.from_hf_dict({**params.config.to_hf_dict(),
                                     "quantization_config": {"quant_method": "gptq"}})


def test_cli_convert_with_quantize(models, capsys):
    """`swiftkv-jax convert --quantize int8` writes an int8 checkpoint; with --hf it is refused."""
    from swiftkv_jax.cli import main
    out = models["gqa_tied"].parent / "gqa_int8"
    assert main(["convert", str(models["gqa_tied"]), str(out), "--quantize", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    assert load_checkpoint(out).config.quantization == "int8"
    assert main(["convert", str(models["gqa_tied"]), str(out) + "-hf", "--quantize", "int8", "--hf"]) == 2
    assert "leave --quantize out" in capsys.readouterr().err
