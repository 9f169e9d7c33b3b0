"""int8 weights against float32 and against llama.cpp, in one run: speed, bytes and quality.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_quantized.py --peer-python /tmp/lc/bin/python

(`python3 -m venv /tmp/lc && /tmp/lc/bin/pip install llama-cpp-python==0.3.36` builds llama.cpp for
this CPU, ~15 min on 2 cores; without --peer-python the llama.cpp rows are skipped.) About 10 min.

Measures, on SmolLM2-135M-Instruct (the shipped Q4_1 GGUF: ours dequantised to float32, then
`params.quantize("int8")`; llama.cpp reads the GGUF as it is, Q4_1, ~5 bits a weight):
  * ceilings: read bandwidth (jitted sum over 1 GiB) and float32 matmul FLOP/s; the int8 and f32
    batch-1 decode limits = weight bytes / read bandwidth;
  * decode tokens/s at batch 1 and 8 (greedy, 128 tokens after 32, our jitted loop alone; llama.cpp:
    `Llama.eval` one token at a time, 2 threads, greedy on its logits) and prefill at 1000 tokens;
  * quality of int8 against float32 on the same inputs, for the plain model and the shipped SwiftKV
    model: English-text perplexity (exllamav3's calibration text) and mean KL(f32 || int8) per token
    with top-1 agreement; the 20 fixed prompts of swiftkv_answers.py answered greedily (identical
    token for token);
  * params bytes.
Writes results/quantized.{json,md}; prints the table with the floors of issue 29 marked.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DECODE_PROMPT_LEN,
    RESULTS_DIR,
    cpu_name,
    log,
    matmul_flops,
    ours_decode,
    ours_prefill,
    random_prompts,
    read_bandwidth,
)
from swiftkv_answers import PROMPTS  # noqa: E402

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.kernels import cpu as cpu_kernels  # noqa: E402

NEW_TOKENS = 128
PREFILL_LEN = 1000

PEER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, prefill_ids, decode_ids, new_tokens, repeats = json.loads(sys.argv[1])
llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=1280, n_batch=512, verbose=False)
def prefill():
    llm.reset(); t = time.perf_counter(); llm.eval(prefill_ids); return time.perf_counter() - t
def decode():
    llm.reset(); llm.eval(decode_ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1])); out = [tok]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1])); out.append(tok)
    return time.perf_counter() - t, out
prefill(); decode()
pre = min(prefill() for _ in range(repeats))
runs = [decode() for _ in range(repeats)]
best = min(r[0] for r in runs)
print(json.dumps({"prefill_s": pre, "decode_s": best, "decode_tokens": new_tokens - 1,
                  "row0": runs[0][1]}))
"""


def peer(python: str, model: Path, vocab: int, repeats: int) -> dict:
    """llama.cpp's prefill and batch-1 decode on the same GGUF and prompts, in its own process."""
    args = [str(model), random_prompts(vocab, 1, PREFILL_LEN)[0].tolist(),
            random_prompts(vocab, 1, DECODE_PROMPT_LEN)[0].tolist(), NEW_TOKENS, repeats]
    out = subprocess.run([python, "-c", PEER, json.dumps(args)], capture_output=True, text=True,
                         timeout=1200)
    if out.returncode:
        raise RuntimeError(f"llama.cpp run failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["decode_tokens_per_s"] = r["decode_tokens"] / r["decode_s"]
    r["prefill_tokens_per_s"] = PREFILL_LEN / r["prefill_s"]
    return r


def _sums(lr: jax.Array, lt: jax.Array, targets: jax.Array, w: jax.Array) -> dict:
    """Sums over supervised positions (weights w) of log-probs lr (reference) and lt (test):
    KL(ref || test), top-1 agreement, both NLLs of the targets."""
    nll = lambda lp: -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return {"kl": jnp.sum(jnp.sum(jnp.exp(lr) * (lr - lt), -1) * w),
            "top1": jnp.sum((lr.argmax(-1) == lt.argmax(-1)) * w),
            "nll_ref": jnp.sum(nll(lr) * w), "nll_test": jnp.sum(nll(lt) * w), "count": jnp.sum(w)}


@jax.jit
def _quality_sums(ref: sk.Params, test: sk.Params, batch: dict) -> dict:
    """_sums over a batch, both models run as one prefill-shaped pass."""
    lr = jax.nn.log_softmax(sk.forward(ref, None, batch["tokens"], all_logits=True)[0], -1)
    lt = jax.nn.log_softmax(sk.forward(test, None, batch["tokens"], all_logits=True)[0], -1)
    return _sums(lr, lt, batch["targets"], batch["weights"])


def quality(ref: sk.Params, test: sk.Params, data, batch: int = 4) -> dict:
    """Perplexities of both on the text, KL(ref || test) and top-1 agreement per token."""
    totals: dict[str, float] = {}
    for start in range(0, data.num_rows - batch + 1, batch):
        sums = _quality_sums(ref, test, jax.tree.map(jnp.asarray, data.rows(np.arange(start, start + batch))))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = totals["count"]
    return {"kl": totals["kl"] / n, "top1": totals["top1"] / n, "ppl_f32": math.exp(totals["nll_ref"] / n),
            "ppl_int8": math.exp(totals["nll_test"] / n), "tokens": int(n)}


@jax.jit
def _step_sums(test: sk.Params, cache, tokens: jax.Array, lr: jax.Array, targets: jax.Array,
               w: jax.Array) -> tuple[dict, object]:
    """One token of every row through the test model's decode path (a cache, one row each: the
    rows its int8 kernel takes, quantised on the VNNI path) against the reference's log-probs."""
    logits, cache = sk.forward(test, cache, tokens[:, None])
    return _sums(lr, jax.nn.log_softmax(logits, -1), targets, w), cache


def quality_decode(ref: sk.Params, test: sk.Params, data, batch: int = 8) -> dict:
    """quality() with the test model run as decode steps (one token a row a step over its cache),
    the int8 kernel's decode-row path (prefill-shaped passes take its GEMM with VNNI, else XLA's
    dot on a float copy)."""
    totals: dict[str, float] = {}
    for start in range(0, data.num_rows - batch + 1, batch):
        rows = jax.tree.map(jnp.asarray, data.rows(np.arange(start, start + batch)))
        lr_all = jax.nn.log_softmax(sk.forward(ref, None, rows["tokens"], all_logits=True)[0], -1)
        cache = sk.init_cache(test, batch, rows["tokens"].shape[1])
        for t in range(rows["tokens"].shape[1]):
            sums, cache = _step_sums(test, cache, rows["tokens"][:, t], lr_all[:, t], rows["targets"][:, t],
                                     rows["weights"][:, t])
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    n = totals["count"]
    return {"kl": totals["kl"] / n, "top1": totals["top1"] / n, "ppl_f32": math.exp(totals["nll_ref"] / n),
            "ppl_int8": math.exp(totals["nll_test"] / n), "tokens": int(n)}


def answers(params: sk.Params, tokenizer, max_new_tokens: int = 48) -> list[list[int]]:
    """Greedy answers to the 20 fixed prompts (chat template)."""
    from swiftkv_jax.text.tokenization import encode_prompt
    ids = [encode_prompt(tokenizer, p, chat=True) for p in PROMPTS]
    out = []
    for start in range(0, len(ids), 10):  # 10 rows a decode step: the int8 kernel's rows (<= 16)
        got, _ = sk.generate(params, None, ids[start:start + 10], max_new_tokens=max_new_tokens)
        out += got
    return out


def divergences(params: sk.Params, tokenizer, ref: list[list[int]], test: list[list[int]]) -> list[dict]:
    """For each prompt answered differently: the token where the answers part and the reference
    model's top-2 logit gap there (a near tie flips under the smallest perturbation)."""
    from swiftkv_jax.text.tokenization import encode_prompt
    out = []
    for i, (a, b) in enumerate(zip(ref, test)):
        if a == b:
            continue
        at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        ids = encode_prompt(tokenizer, PROMPTS[i], chat=True) + a[:at]
        top2 = np.sort(np.asarray(sk.forward(params, None, jnp.asarray([ids]))[0][0]))[-2:]
        out.append({"prompt": i + 1, "parts_at_token": at, "top2_gap": float(top2[1] - top2[0])})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-python", default=None, help="a python with llama-cpp-python installed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text-rows", type=int, default=24, help="rows of 512 English tokens for quality")
    p.add_argument("--block", type=int, default=None, help="inputs per int8 scale (0: per output)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args()

    from swiftkv_jax.compile_cache import enable_compilation_cache
    from swiftkv_jax.train import data

    enable_compilation_cache()
    r: dict = {"machine": cpu_name(), "platform": platform.platform(), "jax": jax.__version__,
               "command": " ".join(sys.argv)}
    log("ceilings")
    r["read_GBps"] = read_bandwidth() / 1e9
    r["matmul_GFLOPs_f32"] = matmul_flops(jnp.float32) / 1e9
    f32, tokenizer = sk.load(None, progress=False)
    q8 = f32.quantize("int8", args.block)
    r["block"] = q8.config.quantization_block
    vnni = cpu_kernels.int8_vnni_applies(q8.config.hidden_size, r["block"] or q8.config.hidden_size)
    r["int8_decode_path"] = "AVX-512 VNNI, rows quantised per 32 inputs" if vnni else "AVX2 float products"
    r["int8_prefill_path"] = ("the kernel's VNNI GEMM, rows quantised per 32 inputs" if vnni
                              else "XLA's dot on the weights converted to float32")
    r["bytes"] = {"float32": f32.nbytes(), "int8": q8.nbytes()}
    r["bytes_ratio"] = q8.nbytes() / f32.nbytes()
    for name, params in (("float32", f32), ("int8", q8)):
        r[name] = {}
        for batch in (1, 8):
            log(f"{name} decode batch {batch}")
            d = ours_decode(params, batch, NEW_TOKENS, args.repeats)
            r[name][f"decode_b{batch}"] = d.tokens_per_s
            r[name][f"row0_b{batch}"] = d.row0
        log(f"{name} prefill {PREFILL_LEN}")
        prefill = ours_prefill(params, PREFILL_LEN, 16, args.repeats)
        r[name]["prefill_tokens_per_s"] = PREFILL_LEN / prefill.best
        r[name]["bandwidth_limit_b1"] = r["read_GBps"] * 1e9 / params.nbytes()
        r[name]["share_of_limit_b1"] = r[name]["decode_b1"] / r[name]["bandwidth_limit_b1"]
        log(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in r[name].items() if not k.startswith("row0")))
    if args.peer_python:
        log("llama.cpp")
        r["llama.cpp"] = peer(args.peer_python, sk.default_model_path(), f32.config.vocab_size, args.repeats)
        log(f"llama.cpp: decode {r['llama.cpp']['decode_tokens_per_s']:.1f} tokens/s, prefill "
            f"{r['llama.cpp']['prefill_tokens_per_s']:.0f} tokens/s")
    log("quality")
    text = data.pack(tokenizer, data.calibration_text(), 512)
    text = data.Packed(*(a[:args.text_rows] for a in (text.tokens, text.targets, text.weights)))
    swift = sk.load("smollm2-swiftkv", progress=False, tokenizer=False)[0]
    r["quality"] = {}
    for name, ref in (("plain", f32), ("swiftkv", swift)):
        test = ref.quantize("int8", args.block)
        log(f"quality {name}")
        qd = quality_decode(ref, test, text)
        qd["prefill_path"] = quality(ref, test, text)
        a, b = answers(ref, tokenizer), answers(test, tokenizer)
        qd["answers_identical"] = sum(x == y for x, y in zip(a, b))
        qd["divergences"] = divergences(ref, tokenizer, a, b)
        qd["ppl_ratio"] = qd["ppl_int8"] / qd["ppl_f32"]
        r["quality"][name] = qd

    rows = summary(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized.json").write_text(json.dumps(r, indent=1))
    (out / "quantized.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


def summary(r: dict) -> list[str]:
    """The markdown table, floors marked."""
    f, q, lc = r["float32"], r["int8"], r.get("llama.cpp")
    mark = lambda ok: "PASS" if ok else "FAIL"
    rows = [f"# int8 weights: {r['machine']}, read {r['read_GBps']:.1f} GB/s, f32 matmul "
            f"{r['matmul_GFLOPs_f32']:.0f} GFLOP/s; block {r['block']} inputs per scale", "",
            "| | float32 | int8 | llama.cpp Q4_1 | floor |", "|---|---|---|---|---|"]
    lc_b1 = lc["decode_tokens_per_s"] if lc else None
    peer_b1 = f"{lc_b1:.1f}" if lc else "-"
    vs_peer = f"{q['decode_b1'] / lc_b1:.2f}x {mark(q['decode_b1'] >= 1.2 * lc_b1)}" if lc else "SKIP"
    rows.append(f"| decode batch 1, tokens/s | {f['decode_b1']:.1f} | {q['decode_b1']:.1f} | "
                f"{peer_b1} | int8 >= 1.2x llama.cpp: {vs_peer} |")
    rows.append(f"| batch 1 share of the bandwidth limit | {f['share_of_limit_b1']:.0%} | "
                f"{q['share_of_limit_b1']:.0%} | | int8 >= 75%: {mark(q['share_of_limit_b1'] >= 0.75)} |")
    rows.append(f"| decode batch 8, tokens/s | {f['decode_b8']:.1f} | {q['decode_b8']:.1f} | | int8 >= 2x "
                f"f32: {q['decode_b8'] / f['decode_b8']:.2f}x {mark(q['decode_b8'] >= 2 * f['decode_b8'])} |")
    peer_pre = f"{lc['prefill_tokens_per_s']:.0f}" if lc else "-"
    rows.append(f"| prefill {PREFILL_LEN} tokens, tokens/s | {f['prefill_tokens_per_s']:.0f} | "
                f"{q['prefill_tokens_per_s']:.0f} | {peer_pre} | int8 >= f32: "
                f"{q['prefill_tokens_per_s'] / f['prefill_tokens_per_s']:.2f}x "
                f"{mark(q['prefill_tokens_per_s'] >= 0.98 * f['prefill_tokens_per_s'])} (2% noise) |")
    rows.append(f"| params MB | {r['bytes']['float32'] / 1e6:.0f} | {r['bytes']['int8'] / 1e6:.0f} | | "
                f"<= 0.3x: {r['bytes_ratio']:.3f}x {mark(r['bytes_ratio'] <= 0.3)} |")
    rows += ["", f"Quality, int8 run as decode steps (its kernel: {r.get('int8_decode_path', '?')}; "
             "in brackets: run as one prefill-shaped pass, "
             f"{r.get('int8_prefill_path', 'XLA dot on the weights converted to float32')}):", "",
             "| model | ppl f32 | ppl int8 | ratio (<= 1.01) | KL(f32 ‖ int8)/token (<= 0.01) | top-1 | "
             "20 prompts identical (>= 18) |", "|---|---|---|---|---|---|---|"]
    for name, qd in r["quality"].items():
        pre = qd.get("prefill_path", {})
        side = (lambda key, fmt: f" ({format(pre[key], fmt)})" if key in pre else "")
        ratio_pre = f" ({pre['ppl_int8'] / pre['ppl_f32']:.4f})" if pre else ""
        rows.append(f"| {name} | {qd['ppl_f32']:.3f} | {qd['ppl_int8']:.3f}{side('ppl_int8', '.3f')} | "
                    f"{qd['ppl_ratio']:.4f}{ratio_pre} {mark(qd['ppl_ratio'] <= 1.01)} | {qd['kl']:.5f}"
                    f"{side('kl', '.5f')} {mark(qd['kl'] <= 0.01)} | {qd['top1']:.1%}{side('top1', '.1%')} | "
                    f"{qd['answers_identical']} {mark(qd['answers_identical'] >= 18)} |")
    for name, qd in r["quality"].items():
        parts = ", ".join(f"#{d['prompt']} at token {d['parts_at_token']} (gap {d['top2_gap']:.3f})"
                          for d in qd["divergences"])
        rows.append(f"\n{name}: answers part where float32 is near a tie: {parts or 'none'}")
    rows.append(f"\n({r['quality']['plain']['tokens']} English tokens; command: `{r['command']}`)")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
