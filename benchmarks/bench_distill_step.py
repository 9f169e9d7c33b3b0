"""Distillation throughput: one jitted train step of SmolLM2-135M at SwiftKV L = 15 (g = 1), the
recipe's batch (4 x 240 tokens), float32, with the machine's matmul ceiling beside it.

Times the step the trainer runs (train/distill.py make_train_step) on random tokens with every
position supervised, and with half of them (as a chat corpus with assistant-only supervision), and
the same step with the KL written plainly over full [B, T, V] logits (the trainer before
train/head_kl.py), all in one run; reports tokens/s, the step's FLOPs (XLA's cost analysis) and
their share of the measured matmul rate.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_distill_step.py   (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, cpu_name, log, matmul_flops, save_results, table  # noqa: E402

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.model.forward import lower_hidden, upper_logits  # noqa: E402
from swiftkv_jax.model.params import merge  # noqa: E402
from swiftkv_jax.train import distill  # noqa: E402
from swiftkv_jax.train.distill import DistillConfig, init_state, make_optimizer, make_train_step  # noqa: E402


def plain_loss_sums(trainable, params, batch, temperature):
    """The KL over full logits, as the trainer computed it before the fused head (the reference)."""
    h_l = jax.lax.stop_gradient(lower_hidden(params, batch["tokens"]))
    t_logits, t_last = jax.lax.stop_gradient(upper_logits(params, h_l, use_swiftkv=False))
    s_logits, s_last = upper_logits(merge(trainable, params), h_l, use_swiftkv=True)
    t_logp = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    mse = jnp.mean(jnp.square(s_last - t_last), axis=-1)
    return temperature**2 * jnp.sum(kl * batch["weights"]), jnp.sum(mse * batch["weights"])


def batch(config: DistillConfig, vocab: int, supervised: float, seed: int = 0) -> dict[str, jax.Array]:
    """[1, B, T] random tokens; the last `supervised` share of each row's positions supervised."""
    rng = np.random.default_rng(seed)
    shape = (1, config.batch_size, config.seq_len)
    weights = np.zeros(shape, np.float32)
    weights[..., int(config.seq_len * (1 - supervised)):] = 1.0
    return {"tokens": jnp.asarray(rng.integers(0, vocab, shape), jnp.int32), "weights": jnp.asarray(weights)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="distill_step")
    args = p.parse_args(argv)
    params, _ = sk.load(sk.default_model_path(), progress=False)
    params = sk.to_swiftkv(params, 15, 1)
    config = DistillConfig()
    optimizer = make_optimizer(config, 1000)
    tokens = config.batch_size * config.seq_len
    res = {"cpu": cpu_name(), "batch": [config.batch_size, config.seq_len], "cases": {}}
    res["matmul_gflops"] = matmul_flops(jnp.float32) / 1e9
    fused = distill.loss_sums
    for loss_name, loss in (("fused head KL", fused), ("plain logits (before)", plain_loss_sums)):
        distill.loss_sums = loss  # distill_loss calls it by its module name
        step = make_train_step(config, optimizer)
        for share in (1.0, 0.5):
            b = batch(config, params.config.vocab_size, share)
            state = init_state(params, optimizer)
            flops = float(step.lower(state, params, b).compile().cost_analysis().get("flops", 0.0))
            state, _ = step(state, params, b)  # compiles
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, m = step(state, params, b)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
            best = min(times)
            res["cases"][f"{loss_name}, {int(share * 100)}% supervised"] = {
                "step_s": best, "tokens_per_s": tokens / best, "gflops": flops / 1e9,
                "matmul_share": flops / best / (res["matmul_gflops"] * 1e9)}
            log(f"{loss_name}, {share:.0%} supervised: {best:.2f} s/step, {tokens / best:.0f} tokens/s, "
                f"{flops / 1e9:.0f} GFLOP/step")
    distill.loss_sums = fused
    save_results(args.out, args.name, res, render(res))
    return 0


def render(res: dict) -> str:
    b = res["batch"]
    rows = [[name, f"{c['step_s']:.2f}", f"{c['tokens_per_s']:.0f}", f"{c['gflops']:.0f}",
             f"{100 * c['matmul_share']:.0f}%"] for name, c in res["cases"].items()]
    head = (f"SmolLM2-135M SwiftKV L15 g1 distillation step, batch {b[0]} x {b[1]}, f32, {res['cpu']} "
            f"(matmul {res['matmul_gflops']:.0f} GFLOP/s)")
    return "\n".join([head, ""] + table(
        ["loss, supervised", "s/step (best)", "tokens/s", "GFLOP/step (XLA)", "share of matmul rate"], rows))


if __name__ == "__main__":
    sys.exit(main())
