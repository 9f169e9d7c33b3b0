"""Prefill and decode speed of swiftkv_jax vs Hugging Face transformers on SmolLM2-135M-Instruct.

One process measures, in order:
  1. the machine's ceilings, in JAX: matmul FLOP/s and memory read GB/s;
  2. ours (swiftkv_jax): prefill at each prompt length (batch 1) and greedy decode of
     `--new-tokens` tokens at batch 1 and 8, with compile times;
  3. Hugging Face transformers (PyTorch, same weights dequantized from the same GGUF file):
     the same prefill and decode work.
It prints one table with PASS/FAIL floors and writes generate.json and generate.png to `--out`.

What is timed (every number is the best of `--repeats` steady-state runs, after one warm-up):
  * prefill: one forward over a [1, T] prompt of random token ids that writes the KV cache and
    returns the last token's logits. Ours: `prefill` (jitted). HF: `model(ids, logits_to_keep=1)`,
    so HF, like ours, computes the LM head for the last token only. Time to first token ~ this.
  * decode: ours: the jitted `decode` while_loop alone (prefill of a 32-token prompt runs
    untimed before it); tokens/s = tokens generated / time. HF: `model.generate(...)` with
    `min_new_tokens = max_new_tokens` and `do_sample=False`, minus the best time of the same
    32-token prefill forward; tokens/s = batch * new tokens / that difference. Both count the
    first new token (sampled from the prefill logits) as a decoded token.
  * compile time (ours): first call minus the best steady-state call. No persistent JAX
    compilation cache is used, so these are real compile times.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_generate.py   (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times must be real ones

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DECODE_PROMPT_LEN,
    RESULTS_DIR,
    CpuShare,
    hf_decode,
    hf_prefill,
    log,
    matmul_flops,
    model_matmuls,
    ours_decode,
    ours_prefill,
    prefill_flops,
    random_prompts,
    read_bandwidth,
)

import swiftkv_jax as sk  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"
# Floors this benchmark checks (issue 14; see check_floors).
FLOOR_PREFILL_LENGTHS = (1000, 1100)
FLOOR_PREFILL_VS_HF = 1.3
FLOOR_PREFILL_VS_MODEL_MATMULS = 0.80  # of the FLOP rate XLA reaches on the model's own matmuls
FLOOR_DECODE_VS_BANDWIDTH = 0.85  # batch 1
FLOOR_DECODE8_VS_HF = 2.0


# ----------------------------------------------------------------------------- Hugging Face

def load_hf(dtype_name: str, threads: int) -> Any:
    """HF LlamaForCausalLM from the same GGUF file (dequantized), eval mode, `threads` threads."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    path = sk.default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype_name))
    return model.eval()


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------- report

def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def check_floors(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(floor, measured, PASS/FAIL/SKIP) for each floor."""
    def row(name: str, value: float | None, floor: float, shown: str) -> tuple[str, str, str]:
        if value is None:
            return name, "not measured", "SKIP"
        return name, shown, "PASS" if value >= floor else "FAIL"

    pct = lambda x: f"{fmt(None if x is None else 100 * x, '.0f')}%"
    rows = []
    for length in FLOOR_PREFILL_LENGTHS:
        p = res["prefill"].get(str(length), {})
        r, m = p.get("ratio"), p.get("ours_fraction_of_model_matmuls")
        rows += [row(f"prefill {length} >= {FLOOR_PREFILL_VS_HF:g}x HF", r, FLOOR_PREFILL_VS_HF,
                     f"{fmt(r, '.2f')}x"),
                 row(f"prefill {length} >= {FLOOR_PREFILL_VS_MODEL_MATMULS:.0%} of XLA's rate on the "
                     "model's matmuls", m, FLOOR_PREFILL_VS_MODEL_MATMULS, pct(m))]
    f = res["decode"].get("1", {}).get("ours_fraction_of_bandwidth_limit")
    r8 = res["decode"].get("8", {}).get("ratio")
    return rows + [
        row(f"decode batch 1 >= {FLOOR_DECODE_VS_BANDWIDTH:.0%} of bandwidth limit", f,
            FLOOR_DECODE_VS_BANDWIDTH, pct(f)),
        row(f"decode batch 8 >= {FLOOR_DECODE8_VS_HF:g}x HF", r8, FLOOR_DECODE8_VS_HF,
            f"{fmt(r8, '.2f')}x"),
    ]


def render_table(res: dict[str, Any]) -> str:
    """The printed report: header with ceilings, one table of metrics, floors."""
    m, c = res["meta"], res["ceilings"]
    lines = [
        f"{MODEL_NAME} ({m['num_parameters'] / 1e6:.1f}M params, {m['param_bytes'] / 1e6:.1f} MB "
        f"{m['dtype']}) on {m['cpu_count']} CPU cores; every number is the best of "
        f"{m['repeats']} runs" + (f"; HF uses {m['torch_threads']} torch threads"
                                  if "torch_threads" in m else ""),
        f"ceilings (JAX): matmul {m['dtype']} {c['matmul_n']}^3 {c['matmul_flops'] / 1e9:.1f} "
        f"GFLOP/s | memory read (sum of 1 GiB f32) {c['read_bytes_per_s'] / 1e9:.1f} GB/s | "
        f"batch-1 decode bandwidth limit = read / param bytes = "
        f"{c['decode_bandwidth_limit_tok_s']:.1f} tok/s",
        "",
    ]
    header = ("metric", "ours", "HF", "ours/HF", "notes")
    rows: list[tuple[str, ...]] = []
    for length, p in res["prefill"].items():
        peak = f"{100 * p['ours_fraction_of_matmul_peak']:.0f}%"
        if p.get("hf_fraction_of_matmul_peak") is not None:
            peak += f" / HF {100 * p['hf_fraction_of_matmul_peak']:.0f}%"
        own = f"; ours {100 * p['ours_fraction_of_model_matmuls']:.0f}% of XLA's " \
              f"{p['model_matmuls_flops'] / 1e9:.0f} GFLOP/s on the model's matmuls" \
            if "model_matmuls_flops" in p else ""
        rows.append((f"prefill {length} tok/s", fmt(p["ours_tok_s"]), fmt(p.get("hf_tok_s")),
                     fmt(p.get("ratio"), ".2f"),
                     f"matmul {c['matmul_n']}^3 peak: ours {peak}{own}; compile {p['ours_compile_s']:.1f} s"))
        rows.append((f"  TTFT {length} ms", fmt(1e3 * p["ours_s"], ".0f"),
                     fmt(None if p.get("hf_s") is None else 1e3 * p["hf_s"], ".0f"), "", ""))
    for batch, d in res["decode"].items():
        note = f"compile {d['ours_compile_s']:.1f} s"
        if "model_matmuls_s" in d:
            note = f"its matmuls alone {1e3 * d['model_matmuls_s']:.1f} ms/step " \
                   f"(= {d['model_matmuls_tok_s']:.0f} tok/s); " + note
        if d.get("ours_fraction_of_bandwidth_limit") is not None:
            bw = f"{100 * d['ours_fraction_of_bandwidth_limit']:.0f}%"
            if d.get("hf_fraction_of_bandwidth_limit") is not None:
                bw += f" / HF {100 * d['hf_fraction_of_bandwidth_limit']:.0f}%"
            note = f"bandwidth limit: ours {bw}; " + note
        rows.append((f"decode batch {batch} tok/s", fmt(d["ours_tok_s"]), fmt(d.get("hf_tok_s")),
                     fmt(d.get("ratio"), ".2f"), note))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines += [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    lines += ["", f"prefill: batch 1, random token ids; TTFT = prefill time. decode: "
              f"{m['new_tokens']} new tokens after a {DECODE_PROMPT_LEN}-token prompt, greedy; "
              f"HF decode = generate() minus its prefill."]
    agree = [f"batch {b}: {d['greedy_agree']}/{m['new_tokens']}" for b, d in res["decode"].items()
             if "greedy_agree" in d]
    if agree:
        lines.append("same model check, greedy tokens of row 0 equal to HF's (leading run): "
                     + ", ".join(agree))
    shares = {k: v for k, v in m.get("other_cpu_share_by_phase", {}).items() if v is not None}
    if shares:
        busy = max(shares.values()) > 0.1
        lines.append("other processes' share of the machine's CPU: " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in shares.items())
            + (" -- BUSY MACHINE: numbers are depressed and noisy (HF's OpenMP threads suffer "
               "most); rerun when idle" if busy else " (quiet machine)"))
    lines += ["", "floors:"] + [f"  {s:4s}  {name}: {val}" for name, val, s in res["floors"]]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Prefill tokens/s vs prompt length (left) and decode tokens/s bars (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = [int(k) for k in res["prefill"]]
    ours = [p["ours_tok_s"] for p in res["prefill"].values()]
    ax1.plot(lengths, ours, "o-", label="swiftkv_jax")
    hf = [p.get("hf_tok_s") for p in res["prefill"].values()]
    if all(h is not None for h in hf):
        ax1.plot(lengths, hf, "s-", label="HF transformers")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(lengths, [str(x) for x in lengths])
    ax1.set_xlabel("prompt tokens (batch 1)")
    ax1.set_ylabel("prefill tokens/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("prefill")
    ax1.legend()
    ax1.grid(alpha=0.3)

    batches = list(res["decode"])
    x = np.arange(len(batches))
    ax2.bar(x - 0.2, [d["ours_tok_s"] for d in res["decode"].values()], 0.4, label="swiftkv_jax")
    hf_dec = [d.get("hf_tok_s") for d in res["decode"].values()]
    if all(h is not None for h in hf_dec):
        ax2.bar(x + 0.2, hf_dec, 0.4, label="HF transformers")
    limit = res["ceilings"]["decode_bandwidth_limit_tok_s"]
    if "1" in res["decode"]:
        i = batches.index("1")
        ax2.hlines(limit, i - 0.45, i + 0.45, color="gray", ls="--", lw=1.5,
                   label=f"batch-1 bandwidth limit ({limit:.0f})")
    ax2.set_xticks(x, [f"batch {b}" for b in batches])
    ax2.set_ylabel("decode tokens/s (all rows)")
    ax2.set_title(f"decode, {res['meta']['new_tokens']} new tokens")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{MODEL_NAME}, {res['meta']['dtype']}, {res['meta']['cpu_count']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1000, 1100, 2048],
                   help="prefill prompt lengths (batch 1)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per row")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per measurement after one warm-up; the best is reported")
    p.add_argument("--skip-hf", action="store_true", help="measure ours and the ceilings only")
    p.add_argument("--hf-threads", type=int, default=os.cpu_count() or 1,
                   help="torch intra-op threads for HF (default: all cores). PyTorch's OpenMP "
                        "threads slow down by 10-50x when other processes share the cores; "
                        "fewer threads than cores is more robust on a busy machine")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1 or min(args.lengths) < 1 or min(args.batch_sizes) < 1:
        p.error("--repeats, --new-tokens, --lengths and --batch-sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    contention: dict[str, float | None] = {}  # phase -> share of CPU other processes used
    cpu = CpuShare()
    cpu.start()

    log(f"loading {MODEL_NAME} (ours, {args.dtype})")
    params, _ = sk.load(None, dtype=jnp.float32, progress=False, tokenizer=False)
    if args.dtype == "bfloat16":
        params = params.astype(jnp.bfloat16)
    cfg = params.config
    meta = {
        "model": MODEL_NAME, "model_file": str(sk.default_model_path()), "dtype": args.dtype,
        "num_parameters": params.num_parameters(), "param_bytes": params.nbytes(),
        "repeats": args.repeats, "statistic": "best", "new_tokens": args.new_tokens,
        "decode_prompt_tokens": DECODE_PROMPT_LEN, "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "command": sys.argv,
    }

    log("machine ceilings: matmul and memory read")
    phase = CpuShare()
    phase.start()
    n = 4096
    flops = matmul_flops(jnp.dtype(args.dtype), n)
    read = read_bandwidth()
    ceilings = {"matmul_n": n, "matmul_flops": flops, "read_bytes_per_s": read,
                "decode_bandwidth_limit_tok_s": read / params.nbytes()}
    log(f"  matmul {flops / 1e9:.1f} GFLOP/s, read {read / 1e9:.1f} GB/s")
    contention["ceilings"] = phase.others()
    phase.start()

    prefill_res: dict[str, dict[str, Any]] = {}
    for length in args.lengths:
        log(f"ours: prefill {length} tokens")
        t = ours_prefill(params, length, args.new_tokens, args.repeats)
        prefill_res[str(length)] = {
            "ours_s": t.best, "ours_tok_s": length / t.best, "ours_compile_s": t.compile,
            "ours_fraction_of_matmul_peak": prefill_flops(cfg, length) / t.best / flops,
            "ours_timing": t.to_json()}
        mm_s, mm_flops = model_matmuls(params, length, 1, args.repeats)
        prefill_res[str(length)].update(
            model_matmuls_s=mm_s, model_matmuls_flops=mm_flops,
            ours_fraction_of_model_matmuls=prefill_flops(cfg, length) / t.best / mm_flops)
        log(f"  {length / t.best:.1f} tok/s, compile {t.compile:.1f} s")

    decode_res: dict[str, dict[str, Any]] = {}
    for batch in args.batch_sizes:
        log(f"ours: decode batch {batch}, {args.new_tokens} new tokens")
        d = ours_decode(params, batch, args.new_tokens, args.repeats)
        entry = {"ours_tok_s": d.tokens_per_s, "ours_s": d.timing.best, "ours_row0": d.row0,
                 "ours_compile_s": d.timing.compile, "tokens": d.tokens,
                 "ours_timing": d.timing.to_json()}
        if batch == 1:
            entry["ours_fraction_of_bandwidth_limit"] = (
                d.tokens_per_s / ceilings["decode_bandwidth_limit_tok_s"])
        mm_s, _ = model_matmuls(params, batch, batch, args.repeats)
        entry.update(model_matmuls_s=mm_s, model_matmuls_tok_s=batch / mm_s)
        decode_res[str(batch)] = entry
        log(f"  {d.tokens_per_s:.1f} tok/s, compile {d.timing.compile:.1f} s")
    del params
    contention["ours"] = phase.others()

    if not args.skip_hf:
        import torch
        import transformers
        meta.update(torch=torch.__version__, transformers=transformers.__version__)
        log(f"loading {MODEL_NAME} (HF transformers, {args.dtype})")
        hf = load_hf(args.dtype, args.hf_threads)
        meta["torch_threads"] = torch.get_num_threads()
        phase.start()
        for length in args.lengths:
            log(f"HF: prefill {length} tokens")
            t = hf_prefill(hf, random_prompts(cfg.vocab_size, 1, length), args.repeats)
            p = prefill_res[str(length)]
            p.update(hf_s=t.best, hf_tok_s=length / t.best,
                     ratio=ratio(p["ours_tok_s"], length / t.best), hf_timing=t.to_json(),
                     hf_fraction_of_matmul_peak=prefill_flops(cfg, length) / t.best / flops)
            log(f"  {length / t.best:.1f} tok/s")
        for batch in args.batch_sizes:
            log(f"HF: decode batch {batch}, {args.new_tokens} new tokens")
            d, pre = hf_decode(hf, batch, args.new_tokens, args.repeats)
            entry = decode_res[str(batch)]
            entry.update(hf_tok_s=d.tokens_per_s, hf_s=d.timing.best,
                         ratio=ratio(entry["ours_tok_s"], d.tokens_per_s),
                         hf_timing=d.timing.to_json(), hf_prefill_timing=pre.to_json(),
                         hf_row0=d.row0, greedy_agree=common_prefix(entry["ours_row0"], d.row0))
            if batch == 1:
                entry["hf_fraction_of_bandwidth_limit"] = (
                    d.tokens_per_s / ceilings["decode_bandwidth_limit_tok_s"])
            log(f"  {d.tokens_per_s:.1f} tok/s; row 0's greedy tokens agree with ours for the "
                f"first {entry['greedy_agree']} of {args.new_tokens}")
        contention["hf"] = phase.others()

    meta["other_cpu_share"] = cpu.others()
    meta["other_cpu_share_by_phase"] = contention
    res = {"meta": meta, "ceilings": ceilings, "prefill": prefill_res, "decode": decode_res}
    res["floors"] = check_floors(res)
    table = render_table(res)
    print("\n" + table, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generate.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "generate.txt").write_text(table + "\n")
    plot(res, args.out / "generate.png")
    log(f"wrote {args.out / 'generate.json'}, generate.txt and generate.png")
    return 1 if any(s == "FAIL" for *_, s in res["floors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
