"""The device check: on a GPU or TPU, does the library answer correctly there, and how fast?

    python benchmarks/device_check.py            # on the device machine; nothing is downloaded
    python benchmarks/device_check.py --tiny     # tiny sizes (the test suite runs this on the CPU)

What it does, in order (each part logs as it goes; JSON and a table go to --out):
  1. the device's name and measured ceilings: read bandwidth (a jitted sum over 1 GiB) and the
     matmul rate in the run's dtype (bfloat16 on GPU/TPU, float32 on a CPU);
  2. correctness: greedy answers of SmolLM2-135M-Instruct (the packaged GGUF) to 8 prompts on the
     device against the same model in float32 on the host CPU (floor: >= 7 of 8 equal); the
     engine's exactness on the device: 8 concurrent requests answer as each alone;
  3. figures on SmolLM2 and on a random Llama-3.1-8B-shaped SwiftKV model (L = 16 of 32):
     prefill tokens/s at 1000 tokens against the matmul rate, decode tokens/s at batch 1, 8, 64
     against the bandwidth limit (weight bytes / read bandwidth, per row at batch 1);
  4. the engine under prompt-heavy load on the 8B-shaped model, SwiftKV L = 16 vs off: 64
     requests of 2000 prompt + 250 new tokens, all at once (as Snowflake measures), total tokens/s.
Planned to take under 8 minutes on one H200-class GPU (most of it compilation of the 8B programs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, log, matmul_flops, ours_decode, ours_prefill, read_bandwidth  # noqa: E402

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.compile_cache import enable_compilation_cache  # noqa: E402

# Llama-3.1-8B's shape (random weights: speed does not depend on their values).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                max_position_embeddings=8192)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=16)
FLOOR_GREEDY_EQUAL = 7  # of 8 prompts


def sizes(tiny: bool) -> dict[str, Any]:
    """Every size the check uses: the real ones, or tiny ones for a CPU smoke run."""
    if tiny:
        return dict(read_bytes=1 << 24, matmul_n=256, prompts=8, prompt_len=(16, 17), answer=8,
                    prefill=64, decode_new=8, batches=(1, 8), load_requests=8, load_prompt=48, load_new=8,
                    load_slots=8, chunk=64, big=TINY, big_layers=2)
    return dict(read_bytes=1 << 30, matmul_n=8192, prompts=8, prompt_len=(8, 40), answer=32, prefill=1000,
                decode_new=64, batches=(1, 8, 64), load_requests=64, load_prompt=2000, load_new=250,
                load_slots=64, chunk=2048, big=LLAMA_8B, big_layers=16)


def greedy(params: sk.Params, prompts: list[list[int]], n: int) -> list[list[int]]:
    return [sk.generate(params, None, p, max_new_tokens=n, stop_ids=[])[0] for p in prompts]


def check_correctness(params: sk.Params, reference: sk.Params, cpu: jax.Device, s: dict[str, Any]
                      ) -> dict[str, Any]:
    """Greedy answers on the device vs float32 on the host CPU, and the engine vs each alone."""
    rng = np.random.default_rng(0)
    vocab = params.config.vocab_size
    prompts = [rng.integers(3, vocab, int(rng.integers(*s["prompt_len"]))).tolist()
               for _ in range(s["prompts"])]
    on_device = greedy(params, prompts, s["answer"])
    with jax.default_device(cpu):
        on_cpu = greedy(reference, prompts, s["answer"])
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
             for x, y in zip(on_device, on_cpu)]
    equal = sum(x == y for x, y in zip(on_device, on_cpu))
    log(f"greedy on the device vs float32 on the CPU: {equal} of {len(prompts)} equal "
        f"(tokens agreeing before the first difference: {agree})")
    engine = sk.Engine(params, max_slots=8, max_length=64 + s["answer"], chunk_size=64, decode_steps=8)
    handles = [engine.submit(p, sk.SamplingOptions(max_tokens=s["answer"], stop_ids=())) for p in prompts]
    concurrent = [h.result() for h in handles]
    exact = concurrent == on_device
    log(f"engine: {len(prompts)} concurrent requests answer as each alone: {exact}")
    return {"greedy_equal": equal, "prompts": len(prompts), "agreeing_prefix": agree, "engine_exact": exact}


def figures(name: str, params: sk.Params, ceilings: dict[str, float], s: dict[str, Any]) -> dict[str, Any]:
    """Prefill and decode speed of one model against the device's ceilings."""
    nbytes, n_params = params.nbytes(), params.num_parameters()
    pre = ours_prefill(params, s["prefill"], s["decode_new"], repeats=3)
    prefill_tok_s = s["prefill"] / pre.best
    out: dict[str, Any] = {"weights_bytes": nbytes, "prefill_tok_s": prefill_tok_s,
                           "prefill_of_matmul_rate": 2 * n_params * prefill_tok_s / ceilings["matmul_flops"],
                           "decode": {}}
    log(f"{name}: prefill {s['prefill']} tokens {prefill_tok_s:,.0f} tok/s "
        f"({out['prefill_of_matmul_rate']:.0%} of the matmul rate)")
    limit = ceilings["read_bytes_per_s"] / nbytes  # tokens/s of one row reading every weight once a step
    for batch in s["batches"]:
        d = ours_decode(params, batch, s["decode_new"], repeats=3)
        out["decode"][batch] = {"tok_s": d.tokens_per_s, "of_bandwidth_limit": d.tokens_per_s / batch / limit}
        log(f"{name}: decode batch {batch}: {d.tokens_per_s:,.1f} tok/s "
            f"({out['decode'][batch]['of_bandwidth_limit']:.0%} of the bandwidth limit per row)")
    return out


def engine_load(base: sk.Params, layers: int, s: dict[str, Any]) -> dict[str, Any]:
    """Total tokens/s of the engine under prompt-heavy load, SwiftKV L = `layers` vs off."""
    rng = np.random.default_rng(1)
    vocab = base.config.vocab_size
    work = [rng.integers(3, vocab, s["load_prompt"]).tolist() for _ in range(s["load_requests"])]
    max_length = -(-(s["load_prompt"] + s["load_new"]) // 16) * 16
    out: dict[str, Any] = {}
    for label, params in ((f"L{layers}", sk.to_swiftkv(base, layers, 1)), ("off", base)):
        engine = sk.Engine(params, max_slots=s["load_slots"], max_length=max_length, chunk_size=s["chunk"],
                           decode_steps=8)
        options = sk.SamplingOptions(max_tokens=s["load_new"], stop_ids=())
        for run in ("warm-up (compiles what the load needs)", "measured"):
            engine.start()
            t0 = time.perf_counter()
            handles = [engine.submit(p, options) for p in work]
            produced = sum(len(h.result()) for h in handles)
            seconds = time.perf_counter() - t0
            engine.stop()
            engine.cache = engine.cache.clear()  # the measured run must not hit the warm-up's prompts
            log(f"engine {label}, {run}: {seconds:.1f} s")
        out[label] = (len(work) * s["load_prompt"] + produced) / seconds
        log(f"engine {label}: {out[label]:,.0f} total tok/s")
        del engine, params
    out["ratio"] = out[f"L{layers}"] / out["off"]
    return out


def render(res: dict[str, Any]) -> str:
    c = res["ceilings"]
    lines = [f"device check: {res['device']} ({res['platform']}), {res['dtype']}; read "
             f"{c['read_bytes_per_s'] / 1e9:.0f} GB/s, matmul {c['matmul_flops'] / 1e12:.1f} TFLOP/s",
             f"command: {res['command']}", "",
             f"greedy equal to float32 on the CPU: {res['correctness']['greedy_equal']} of "
             f"{res['correctness']['prompts']}; engine exact: {res['correctness']['engine_exact']}", "",
             "| model | prefill tok/s (% matmul) | " + " | ".join(f"decode b{b} tok/s (% limit)"
                                                        for b in res["batches"]) + " |",
             "|---" * (2 + len(res["batches"])) + "|"]
    for name, f in res["models"].items():
        cells = [f"{f['decode'][b]['tok_s']:,.1f} ({f['decode'][b]['of_bandwidth_limit']:.0%})"
                 for b in res["batches"]]
        lines.append(f"| {name} | {f['prefill_tok_s']:,.0f} ({f['prefill_of_matmul_rate']:.0%}) | "
                     + " | ".join(cells) + " |")
    e = res["engine"]
    load = ", ".join(f"{k} {v:,.2f}" if k == "ratio" else f"{k} {v:,.0f} tok/s" for k, v in e.items())
    lines += ["", f"engine, {res['load']}: {load}",
              "", "floors:"] + [f"  {'PASS' if ok else 'FAIL'}  {name}" for name, ok in res["floors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and random models (a CPU smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    enable_compilation_cache()
    s = sizes(args.tiny)
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    log(f"device: {device.device_kind} ({device.platform}), {jnp.dtype(dtype).name}")
    ceilings = {"read_bytes_per_s": read_bandwidth(s["read_bytes"]),
                "matmul_flops": matmul_flops(dtype, s["matmul_n"])}
    log(f"read {ceilings['read_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"matmul {ceilings['matmul_flops'] / 1e12:.2f} TFLOP/s")
    if args.tiny:
        small = sk.init_params(sk.ModelConfig(**TINY), jax.random.PRNGKey(0), dtype)
        reference = jax.device_put(small.astype(jnp.float32), cpu)
    else:
        small, _ = sk.load(dtype=dtype, progress=False)
        with jax.default_device(cpu):
            reference, _ = sk.load(dtype=jnp.float32, progress=False)
    name = "tiny random" if args.tiny else "SmolLM2-135M"
    command = " ".join(["python benchmarks/device_check.py", *(sys.argv[1:] if argv is None else argv)])
    res: dict[str, Any] = {"device": device.device_kind, "platform": device.platform,
                           "dtype": jnp.dtype(dtype).name, "command": command, "ceilings": ceilings,
                           "batches": list(s["batches"])}
    res["correctness"] = check_correctness(small, reference, cpu, s)
    del reference
    big_name = "tiny random SwiftKV" if args.tiny else "Llama-3.1-8B-shaped SwiftKV L16"
    big_base = sk.init_params(sk.ModelConfig(**s["big"]), jax.random.PRNGKey(1), dtype)
    res["models"] = {name: figures(name, small, ceilings, s),
                     big_name: figures(big_name, sk.to_swiftkv(big_base, s["big_layers"], 1), ceilings, s)}
    res["load"] = f"{s['load_requests']} requests x ({s['load_prompt']} prompt + {s['load_new']} new)"
    res["engine"] = engine_load(big_base, s["big_layers"], s)
    res["floors"] = [(f"greedy equal on >= {FLOOR_GREEDY_EQUAL} of 8 prompts",
                      res["correctness"]["greedy_equal"] >= FLOOR_GREEDY_EQUAL),
                     ("the engine's concurrent answers equal each alone", res["correctness"]["engine_exact"])]
    if device.platform != "cpu":
        big = res["models"][big_name]["decode"][1]["of_bandwidth_limit"]
        res["floors"] += [(f"8B-shaped decode at batch 1 >= 60% of the bandwidth limit ({big:.0%})",
                           big >= 0.6),
                          (f"SwiftKV L16 vs off >= 1.6x total tokens/s ({res['engine']['ratio']:.2f}x)",
                           res["engine"]["ratio"] >= 1.6)]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"device_check_{device.platform}" + ("_tiny" if args.tiny else "")
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    text = render(res)
    (args.out / f"{stem}.txt").write_text(text + "\n")
    print(text)
    return 0 if all(ok for _, ok in res["floors"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
