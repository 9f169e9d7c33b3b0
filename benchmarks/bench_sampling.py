"""Decode speed with sampling against greedy, on the real model, at batch 1 and 16.

Sampling should cost next to nothing over greedy: top-k / top-p pick among each row's best 256
logits (lax.top_k) and sort the vocabulary only when the kept set is wider. Reported as the ratio
sampled / greedy decode tokens/s (a full 49k-token sort per step made it 0.46 at batch 16).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR  # noqa: E402

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.compile_cache import enable_compilation_cache  # noqa: E402
from swiftkv_jax.train import data  # noqa: E402

SETTINGS = {"greedy": dict(temperature=0.0), "temperature 0.7": dict(temperature=0.7),
            "top-p 0.9": dict(temperature=0.7, top_p=0.9), "top-k 50": dict(temperature=0.7, top_k=50)}


def decode_tokens_per_s(params, tokenizer, batch: int, new_tokens: int = 64) -> dict[str, float]:
    """Decode tokens/s of each setting for `batch` ShareGPT prompts (best of 2, cache cleared)."""
    prompts = data.sharegpt_prompts(batch)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ids]
    cache = sk.init_cache(params, batch, max(map(len, ids)) + new_tokens)
    result = {}
    for name, kw in SETTINGS.items():
        best = 0.0
        for _ in range(2):
            cache = cache.clear()
            timings: dict[str, float] = {}
            _, cache = sk.generate(params, cache, ids, max_new_tokens=new_tokens, stop_ids=[],
                                   timings=timings, seed=0, **kw)
            best = max(best, batch * (new_tokens - 1) / timings["decode_s"])
        result[name] = round(best, 1)
    return result


def main() -> None:
    enable_compilation_cache()
    params, tokenizer = sk.load(None, progress=False)
    rows = {batch: decode_tokens_per_s(params, tokenizer, batch) for batch in (1, 16)}
    print("| batch | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for batch, r in rows.items():
        cells = [f"{r[n]:.1f} ({r[n] / r['greedy']:.2f}x)" for n in SETTINGS]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    (RESULTS_DIR / "sampling.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
