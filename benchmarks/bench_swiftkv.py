"""SwiftKV on vs off in one run: prefill speed-up, decode speed, KV-cache bytes per token.

SmolLM2-135M-Instruct with L = 15 of 30 layers (50% SingleInputKV), g = 1 and g = 3 (AcrossKV),
against the same engine with SwiftKV off (the plain model). The SwiftKV weights are the
initialisation-rule weights (to_swiftkv): quality is the distillation issue's business; speed and
memory do not depend on the values. Measurements are interleaved (off, g1, g3, off, ...) so a
noisy machine hurts every variant alike; every number is the best of `--repeats` runs.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_swiftkv.py   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, CpuShare, log, matmul_flops, ours_decode, ours_prefill, read_bandwidth  # noqa: E402

import swiftkv_jax as sk  # noqa: E402

FLOOR_PREFILL_SPEEDUP = 1.7  # at 1024 and 2048 tokens
FLOOR_DECODE_RATIO = 0.9  # SwiftKV decode within 10% of SwiftKV off


def variants(base: sk.Params, layers: int, groups: list[int]) -> dict[str, sk.Params]:
    out = {"off": base}
    for g in groups:
        out[f"L{layers} g{g}"] = sk.to_swiftkv(base, layers, g)
    return out


def measure(models: dict[str, sk.Params], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill per length and decode per batch size, each variant in turn, interleaved."""
    res: dict[str, Any] = {"prefill": {}, "decode": {}, "kv_bytes_per_token": {}}
    for name, p in models.items():
        res["kv_bytes_per_token"][name] = sk.init_cache(p, 1, 16).bytes_per_token()
    for length in args.lengths:
        row = res["prefill"][str(length)] = {}
        for name, p in models.items():
            t = ours_prefill(p, length, 1, args.repeats)
            row[name] = {"tok_s": length / t.best, "ttft_ms": 1e3 * t.best, "compile_s": t.compile}
            log(f"prefill {length:5d} {name:8s} {length / t.best:8.1f} tok/s")
    for batch in args.batch_sizes:
        row = res["decode"][str(batch)] = {}
        for name, p in models.items():
            d = ours_decode(p, batch, args.new_tokens, args.repeats)
            row[name] = {"tok_s": d.tokens_per_s, "compile_s": d.timing.compile}
            log(f"decode batch {batch} {name:8s} {d.tokens_per_s:8.1f} tok/s")
    return res


def floors(res: dict[str, Any], models: dict[str, sk.Params]) -> list[tuple[str, str, bool]]:
    out = []
    n = models["off"].config.num_layers
    for name, p in models.items():
        if name == "off":
            continue
        cfg = p.config
        for length in ("1024", "2048"):
            if length in res["prefill"]:
                s = res["prefill"][length][name]["tok_s"] / res["prefill"][length]["off"]["tok_s"]
                out.append((f"{name}: prefill {length} speed-up >= {FLOOR_PREFILL_SPEEDUP}x", f"{s:.2f}x",
                            s >= FLOOR_PREFILL_SPEEDUP))
        for batch, row in res["decode"].items():
            r = row[name]["tok_s"] / row["off"]["tok_s"]
            out.append((f"{name}: decode batch {batch} >= {FLOOR_DECODE_RATIO:.0%} of off", f"{r:.2f}",
                        r >= FLOOR_DECODE_RATIO))
        kv = res["kv_bytes_per_token"]
        expected = (cfg.num_key_value_layers + cfg.num_kv_groups) / n
        got = kv[name] / kv["off"]
        out.append((f"{name}: KV bytes/token = {cfg.num_key_value_layers}+{cfg.num_kv_groups} of {n} "
                    f"layers ({expected:.3f} of off)", f"{got:.3f}", got == expected))
    return out


def render(res: dict[str, Any], names: list[str]) -> str:
    c = res["ceilings"]
    lines = [f"SmolLM2-135M-Instruct f32, SwiftKV off vs on (best of {res['repeats']} runs); machine: "
             f"matmul {c['matmul_flops'] / 1e9:.0f} GFLOP/s, read {c['read_bytes_per_s'] / 1e9:.1f} GB/s",
             "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for length, row in res["prefill"].items():
        off = row["off"]["tok_s"]
        lines.append(f"| prefill {length} tok/s | " + " | ".join(
            f"{row[n]['tok_s']:.0f}" + ("" if n == "off" else f" ({row[n]['tok_s'] / off:.2f}x)")
            for n in names) + " |")
        lines.append(f"| TTFT {length} ms | " + " | ".join(f"{row[n]['ttft_ms']:.0f}" for n in names) + " |")
    for batch, row in res["decode"].items():
        off = row["off"]["tok_s"]
        lines.append(f"| decode batch {batch} tok/s | " + " | ".join(
            f"{row[n]['tok_s']:.1f}" + ("" if n == "off" else f" ({row[n]['tok_s'] / off:.2f}x)")
            for n in names) + " |")
    kv = res["kv_bytes_per_token"]
    lines.append("| KV bytes/token | " + " | ".join(
        f"{kv[n]}" + ("" if n == "off" else f" ({kv[n] / kv['off']:.3f}x)") for n in names) + " |")
    lines += ["", "floors:"] + [f"  {'PASS' if ok else 'FAIL'}  {name}: {val}" for name, val, ok in res["floors"]]
    share = res.get("other_cpu_share")
    if share is not None:
        lines.append(f"other processes used {100 * share:.0f}% of the machine's CPU during the run")
    return "\n".join(lines)


def plot(res: dict[str, Any], names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = [int(x) for x in res["prefill"]]
    for n in names:
        a1.plot(lengths, [res["prefill"][str(x)][n]["tok_s"] for x in lengths], "o-", label=n)
    a1.set(xscale="log", xlabel="prompt tokens", ylabel="prefill tokens/s", title="prefill")
    a1.set_xticks(lengths, [str(x) for x in lengths])
    a1.set_ylim(bottom=0)
    kv = res["kv_bytes_per_token"]
    a2.bar(names, [kv[n] / 1024 for n in names], color=["gray"] + ["C1"] * (len(names) - 1))
    a2.set(ylabel="KV cache KiB per token", title="KV cache size")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    a1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=15, help="num_key_value_layers L")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 3], help="AcrossKV group sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    cpu = CpuShare()
    cpu.start()
    log("loading SmolLM2-135M-Instruct")
    base, _ = sk.load(None, dtype=jnp.float32, progress=False, tokenizer=False)
    models = variants(base, args.layers, args.groups)
    log("machine ceilings")
    res = {"repeats": args.repeats, "command": sys.argv,
           "ceilings": {"matmul_flops": matmul_flops(jnp.float32), "read_bytes_per_s": read_bandwidth()}}
    res.update(measure(models, args))
    res["floors"] = floors(res, models)
    res["other_cpu_share"] = cpu.others()
    table = render(res, list(models))
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swiftkv.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "swiftkv.txt").write_text(table + "\n")
    plot(res, list(models), args.out / "swiftkv.png")
    log(f"wrote {args.out}/swiftkv.json, .txt and .png")
    return 0 if all(ok for *_, ok in res["floors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
