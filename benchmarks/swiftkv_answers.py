"""Twenty fixed short prompts answered greedily by a SwiftKV model and by its teacher (the same
weights with SwiftKV off), side by side: the check a user makes before trusting a distilled model.

    PYTHONPATH=. .venv/bin/python benchmarks/swiftkv_answers.py [--model smollm2-swiftkv]

Writes benchmarks/results/swiftkv_answers_<name>.{json,md}. Whether an answer "says the same" is
judged by reading the table (the README records the judgement); the script only marks answers
that are identical word for word and checks the one fact every model must get right.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
    "What is the boiling point of water in degrees Celsius?",
    "What color is the sky on a clear day?",
    "What is 7 + 5?",
    "What is 12 times 3?",
    "I have 10 apples and eat 3. How many apples are left?",
    "List the three primary colors.",
    "Name the four seasons of the year.",
    "Translate 'Good morning' into French.",
    "Translate 'thank you' into Spanish.",
    "Give me a synonym for 'happy'.",
    "What is the opposite of 'cold'?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Write one sentence about why exercise is good for your health.",
    "Summarize in one sentence: The cat sat on the mat all afternoon, watching the birds outside "
    "the window.",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-swiftkv", help="a SwiftKV model: shipped name or path")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args()

    import swiftkv_jax as sk
    from swiftkv_jax.compile_cache import enable_compilation_cache
    from swiftkv_jax.train.evaluate import side_by_side

    enable_compilation_cache()
    params, tokenizer = sk.load(args.model, progress=False)
    if not params.config.swiftkv:
        raise SystemExit(f"{args.model} is a plain model; give a SwiftKV one")
    t0 = time.perf_counter()
    rows = side_by_side(params, tokenizer, PROMPTS, args.max_new_tokens)
    elapsed = time.perf_counter() - t0
    for r in rows:
        r["identical"] = r["teacher"] == r["student"]
    paris = "paris" in rows[0]["student"].lower()
    cfg = params.config
    name = Path(args.model).name if Path(args.model).exists() else args.model
    result = {"model": args.model, "num_key_value_layers": cfg.num_key_value_layers,
              "key_value_group_size": cfg.key_value_group_size, "max_new_tokens": args.max_new_tokens,
              "identical": sum(r["identical"] for r in rows), "france_answered_paris": paris,
              "seconds": round(elapsed, 1), "rows": rows}
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"swiftkv_answers_{name}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
    lines = [f"# {args.model}: greedy answers, teacher (SwiftKV off) vs student (L={cfg.num_key_value_layers}, "
             f"g={cfg.key_value_group_size}), {args.max_new_tokens} tokens at most", "",
             "| # | prompt | teacher | student | identical |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {cell(r['prompt'])} | {cell(r['teacher'])} | {cell(r['student'])} | "
              f"{'yes' if r['identical'] else ''} |" for i, r in enumerate(rows)]
    (out / f"swiftkv_answers_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n{result['identical']} of {len(rows)} identical; France -> Paris: {paris}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
