"""How much quality each SwiftKV layer costs: SmolLM2-135M distilled at several L (g = 1) with the
same recipe and token budget, each point's quality and prefill speed-up, a table and a plot.

Phases (all by default; each resumable, so a stopped run continues where it was):
  train:  `swiftkv-jax distill` per L (the shipped model's recipe: lstsq K/V init, lr 1e-3, no
          MSE, tau 1, batch 4 x 240, teacher answers to --num-prompts ShareGPT prompts, 10% held
          out) into --work/L<L>/, with --resume; the CLI evaluates the result (eval.json: held-out
          teacher answers' KL / top-1 / perplexities and English-text perplexities).
  speed:  per L, on the initialisation weights (speed does not depend on their values): TTFT of a
          1000-token prompt (generate(), best of 5 rounds interleaved over the L) and engine total
          tokens/s under prompt-heavy load (16 requests of 900-1100 tokens in, 32-64 out, 8 slots,
          best of 2), SwiftKV off beside them.
  report: the table (quality vs speed-up per L) and a plot into --out.

Run: PYTHONPATH=. .venv/bin/python benchmarks/swiftkv_curve.py   (4 points x ~45 min of training at
     ~210 tokens/s on the 2-core EPYC, plus ~15 min of teacher answers once and ~10 min of speed;
     never beside another benchmark)
     --quick: 2 steps per point on 16 prompts (a smoke run of the script, a few minutes)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, cpu_name, log, save_results, table  # noqa: E402

RECIPE = ["--kv-init", "lstsq", "--lr", "1e-3", "--mse-weight", "0", "--temperature", "1",
          "--batch-size", "4", "--seq-len", "240", "--save-every", "20", "--text-eval-chars", "10000"]


def train(layers: int, args: argparse.Namespace) -> Path:
    """Distils (or resumes) the point for L = `layers`; returns its folder (eval.json when done)."""
    out = args.work / f"L{layers}"
    if (out / "eval.json").exists():
        return out
    log(f"distilling L = {layers} ({args.steps} steps) into {out} ...")
    subprocess.run([sys.executable, "-m", "swiftkv_jax.cli", "distill", "-L", str(layers), "-g", "1",
                    "--num-prompts", str(args.num_prompts), "--max-steps", str(args.steps), *RECIPE,
                    "--out", str(out), "--resume"], check=True)
    return out


def speed(layers: list[int], args: argparse.Namespace, save: Callable[[dict[str, Any]], None]
          ) -> dict[str, dict[str, float]]:
    """TTFT at 1000 tokens and engine total tokens/s per L (and "off"); `save` gets the figures so
    far after each configuration."""
    import jax

    import swiftkv_jax as sk
    from swiftkv_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    base, _ = sk.load(progress=False)
    rng = np.random.default_rng(0)
    vocab = base.config.vocab_size
    prompt = rng.integers(3, vocab, args.ttft_tokens).tolist()
    work = [(rng.integers(3, vocab, int(rng.integers(*args.engine_prompts))).tolist(),
             int(rng.integers(32, 65))) for _ in range(args.engine_requests)]
    max_length = -(-(args.engine_prompts[1] + 64) // 16) * 16
    names = ["off"] + [str(L) for L in layers]
    configs = {name: base if name == "off" else sk.to_swiftkv(base, int(name), 1) for name in names}
    # TTFT interleaved over the configurations (off, L1, L2, ..., off, ...), best of --ttft-repeats:
    # this VM's speed drifts by 20-30% within minutes, which back-to-back repeats of one
    # configuration turned into a spurious ratio (2026-12-04: L21 "1.02x" back to back, 1.36-1.57x
    # interleaved in the same hour).
    caches = {name: sk.generate(params, sk.init_cache(params, 1, args.ttft_tokens + 16), prompt,
                                max_new_tokens=1)[1] for name, params in configs.items()}  # compiles
    ttft: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.ttft_repeats):
        for name, params in configs.items():
            cache = caches[name].clear()  # no prefix-cache hit: the whole prompt is prefilled
            t0 = time.perf_counter()
            _, caches[name] = sk.generate(params, cache, prompt, max_new_tokens=1)  # token on the host
            ttft[name].append(time.perf_counter() - t0)
    del caches
    jax.clear_caches()
    out: dict[str, dict[str, float]] = {}
    for name, params in configs.items():
        engine = sk.Engine(params, max_slots=8, max_length=max_length, chunk_size=256, decode_steps=8)
        engine.warmup()
        rate = 0.0
        for _ in range(2):  # best of 2, the cache cleared between (no prefix hits)
            t0 = time.perf_counter()
            outs = [h.result() for h in [engine.submit(p, sk.SamplingOptions(max_tokens=n, stop_ids=()))
                                         for p, n in work]]
            tokens = sum(len(p) for p, _ in work) + sum(map(len, outs))
            rate = max(rate, tokens / (time.perf_counter() - t0))
            engine.cache = engine.cache.clear()
        out[name] = {"ttft_s": min(ttft[name]), "ttft_all_s": ttft[name], "engine_tok_s": rate}
        log(f"speed {name}: TTFT {min(ttft[name]) * 1000:.0f} ms, engine {rate:.0f} total tokens/s")
        save(out)
        del engine
        # Five engines' executables in one process ran the CPU out of mapped memory ("LLVM ERROR:
        # Unable to allocate section memory", 2026-12-04): drop each configuration's programs.
        jax.clear_caches()
        gc.collect()
    return out


def report(layers: list[int], args: argparse.Namespace, speeds: dict[str, Any]) -> dict[str, Any]:
    """The curve's figures per L: quality (from each run's eval.json) and speed-ups."""
    points = {}
    for L in layers:
        speed = {"ttft_speedup": speeds["off"]["ttft_s"] / speeds[str(L)]["ttft_s"],
                 "engine_speedup": speeds[str(L)]["engine_tok_s"] / speeds["off"]["engine_tok_s"],
                 "ttft_ms": 1000 * speeds[str(L)]["ttft_s"]}
        path = args.work / f"L{L}" / "eval.json"
        if not path.exists():  # an earlier run of the same recipe and budget, kept in the results
            path = args.out / f"distill_L{L}_g1_{args.num_prompts}prompts.json"
        if not path.exists():  # not trained yet: speed only
            points[L] = {**speed, "kl": None, "quality_from": None}
            continue
        ev = json.loads(path.read_text())
        got = ev["results"]["distilled"]
        held, text = got["held-out"], got.get("english", {})
        points[L] = {**speed, "kl": held["kl"], "top1": held["top1"],
                     "ppl_ratio": held["ppl_student"] / held["ppl_teacher"],
                     "text_ppl_ratio": text["ppl_student"] / text["ppl_teacher"] if text else None,
                     "tokens_seen": ev["tokens_seen"], "tokens_per_s": ev["tokens_per_s"],
                     "quality_from": os.path.relpath(path)}
    return points


def render(res: dict[str, Any]) -> str:
    rows = []
    for L, p in sorted(res["points"].items(), key=lambda kv: int(kv[0])):
        speed = [f"{p['ttft_ms']:.0f} ms ({p['ttft_speedup']:.2f}x)", f"{p['engine_speedup']:.2f}x"]
        if p["kl"] is None:
            rows.append([str(L), "not trained yet", "-", "-", "-", *speed])
            continue
        text = f"{p['text_ppl_ratio']:.3f}x" if p["text_ppl_ratio"] else "-"
        rows.append([str(L), f"{p['kl']:.3f}", f"{100 * p['top1']:.1f}%", f"{p['ppl_ratio']:.3f}x", text,
                     *speed])
    head = (f"SmolLM2-135M-Instruct distilled at each L (g = 1), {res['steps']} steps x 960 tokens each, "
            f"{res['cpu']}; speed on the initialisation weights, SwiftKV off = 1 (its TTFT "
            f"{res['off_ttft_ms']:.0f} ms)")
    columns = ["L (of 30)", "held-out KL", "top-1", "ppl vs teacher", "English ppl vs teacher",
               "TTFT 1000 tokens (speed-up)", "engine speed-up"]
    notes = [f"* L={L}: quality from {p['quality_from']} (an earlier run of the same recipe and budget; its "
             "held-out teacher answers were sampled apart from this run's, so compare English perplexity)"
             for L, p in sorted(res["points"].items(), key=lambda kv: int(kv[0]))
             if p["quality_from"] and not p["quality_from"].endswith("eval.json")]
    return "\n".join([head, ""] + table(columns, rows) + ([""] + notes if notes else []))


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(((L, p) for L, p in res["points"].items() if p["kl"] is not None), key=lambda kv: int(kv[0]))
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["ttft_speedup"] for _, p in pts]
    y = [p["text_ppl_ratio"] or p["ppl_ratio"] for _, p in pts]
    ax.plot(x, y, "o-")
    for (L, _), xi, yi in zip(pts, x, y):
        ax.annotate(f"L={L}", (xi, yi), textcoords="offset points", xytext=(5, 5))
    ax.axhline(1.10, color="gray", ls="--", lw=1)  # the second shipped model's floors (issue 32)
    ax.axvline(1.35, color="gray", ls="--", lw=1)
    ax.text(0.02, 0.96, "dashed: ship floors (ppl <= 1.10x, speed-up >= 1.35x)", transform=ax.transAxes,
            fontsize=8, color="gray", va="top")
    ax.set_xlabel("prefill speed-up at 1000 tokens (x SwiftKV off)")
    ax.set_ylabel("English perplexity (x the base model's)")
    ax.set_title("SwiftKV on SmolLM2-135M: quality lost vs prefill saved")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=lambda v: [int(x) for x in v.split(",")], default=[15, 18, 21, 24])
    p.add_argument("--steps", type=int, default=560, help="optimizer steps per point (4 x 240 tokens each)")
    p.add_argument("--num-prompts", type=int, default=960)
    p.add_argument("--phase", choices=("all", "train", "speed", "report"), default="all")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=Path("runs") / "curve")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="swiftkv_curve", help="results file stem under --out")
    p.add_argument("--ttft-repeats", type=int, default=5, help="interleaved TTFT rounds (best of)")
    args = p.parse_args(argv)
    args.ttft_tokens, args.engine_prompts, args.engine_requests = 1000, (900, 1101), 16
    name = args.name
    if args.quick:
        args.steps, args.num_prompts, name = 2, 16, "swiftkv_curve_quick"
        args.work = args.work.with_name("curve-quick")
        args.ttft_tokens, args.engine_prompts, args.engine_requests = 200, (100, 121), 4
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "train"):
        for L in args.layers:
            train(L, args)
    speed_file = args.work / "speed.json"
    if args.phase in ("all", "speed"):
        speed(args.layers, args, lambda got: speed_file.write_text(json.dumps(got, indent=1)))
    if args.phase in ("all", "report"):
        speeds = json.loads(speed_file.read_text())
        res = {"cpu": cpu_name(), "steps": args.steps, "layers": args.layers,
               "off_ttft_ms": 1000 * speeds["off"]["ttft_s"], "points": report(args.layers, args, speeds)}
        save_results(args.out, name, res, render(res))
        plot(res, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
