"""Distillation settings compared at equal steps from the same starting SwiftKV model.

Each setting trains `--steps` optimizer steps (batch 4 x 240 tokens) from `--model` on the train
split of `--data` (the CLI's 10% held-out split) and is evaluated on the held-out assistant tokens:
mean KL(teacher || student) per token, top-1 agreement, student perplexity. Settings are
`lr:mse_weight:temperature`.

    PYTHONPATH=. .venv/bin/python benchmarks/distill_ablation.py --model runs/smollm2-L15-g1-stage2/model \
        --data ~/.cache/swiftkv-jax/data/sharegpt_421fed13b34c_t160_T0.7_p0.9.jsonl \
        5e-4:1:2 5e-4:0:2 1e-3:0:2 5e-4:0:1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR  # noqa: E402

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.compile_cache import enable_compilation_cache  # noqa: E402
from swiftkv_jax.train import data  # noqa: E402
from swiftkv_jax.train import distill as ds  # noqa: E402
from swiftkv_jax.train.evaluate import evaluate, format_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a SwiftKV model (e.g. a distill run's model/)")
    parser.add_argument("--data", required=True, help="chat JSONL (e.g. the self-distillation cache)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(RESULTS_DIR / "distill_ablation.json"))
    parser.add_argument("settings", nargs="+", metavar="LR:MSE:TAU")
    args = parser.parse_args()
    enable_compilation_cache()
    params, tokenizer = sk.load(args.model, progress=False)
    train, held = data.split_held_out(data.read_examples(args.data), 10.0)
    packed = data.pack(tokenizer, train, 240)
    held_out = data.pack(tokenizer, held, 240, assistant_only=True)
    results = {"start": evaluate(params, held_out)}
    for setting in args.settings:
        lr, mse, tau = (float(x) for x in setting.split(":"))
        config = ds.DistillConfig(learning_rate=lr, mse_weight=mse, temperature=tau, batch_size=4,
                                  seq_len=240, max_steps=args.steps)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            run = ds.distill(params, packed, config, out, overwrite=True)
        name = f"lr {lr:g}, mse weight {mse:g}, tau {tau:g}"
        results[name] = dict(evaluate(run.params, held_out), seconds=round(time.perf_counter() - t0))
    print(format_table({name: {"held-out": r} for name, r in results.items()}))
    Path(args.out).write_text(json.dumps({"model": args.model, "data": Path(args.data).name,
                                          "steps": args.steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
