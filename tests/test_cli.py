"""The swiftkv-jax command line: convert round trips, generate prints real text, errors are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swiftkv_jax as sk
from swiftkv_jax.cli import main


def test_convert_to_checkpoint_and_swiftkv_hf(gqa_model, tmp_path):
    folder, _ = gqa_model
    assert main(["convert", str(folder), str(tmp_path / "ckpt")]) == 0
    base, _ = sk.load(folder, progress=False)
    ckpt, _ = sk.load(tmp_path / "ckpt")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base.weights), jax.tree.leaves(ckpt.weights)))
    assert main(["convert", str(folder), str(tmp_path / "sw"), "--hf", "--num-key-value-layers", "1",
                 "--group-size", "2"]) == 0
    sw, _ = sk.load(tmp_path / "sw", progress=False)
    assert (sw.config.num_key_value_layers, sw.config.key_value_group_size) == (1, 2)
    off = sk.swiftkv_off(sw)  # the original q/k/v travel with the export
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base.weights), jax.tree.leaves(off.weights)))


def test_convert_swiftkv_tensors_only(gqa_model, tmp_path):
    from swiftkv_jax.io import shipped
    folder, _ = gqa_model
    assert main(["convert", str(folder), str(tmp_path / "m"), "--num-key-value-layers", "1",
                 "--swiftkv-tensors"]) == 0
    assert [p.name for p in (tmp_path / "m").iterdir()] == [shipped.TENSORS_FILE]
    base, _ = sk.load(folder, progress=False)
    assert base.fingerprint(jnp.bfloat16) == sk.swiftkv_off(sk.to_swiftkv(base, 1)).fingerprint(jnp.bfloat16)


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path") and "Traceback" not in err
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_prints_the_answer_of_the_default_model(capsys):
    try:
        sk.default_model_path()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "12", "--verbose"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "first token" in out.err and "[start-up: " in out.err


@pytest.mark.real_model
def test_generate_with_int8_weights_answers_like_the_float_model(capsys):
    """`--quantize int8` on the real model: the same right answer, from a quarter of the bytes."""
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "12",
                 "--quantize", "int8"]) == 0
    assert "Paris" in capsys.readouterr().out
