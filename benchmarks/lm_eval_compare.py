"""The shipped SwiftKV SmolLM2 against its base, scored by lm-evaluation-harness through our server.

For each model a real `swiftkv-jax serve` process on 127.0.0.1 (f32), then `lm-eval run --model
local-completions` on a local English multiple-choice task (benchmarks/lm_eval_tasks/, 40
everyday questions, no hub download), as a user would run it. Reports accuracy (acc, acc_norm
with their standard errors), how often the two models pick the same answer, and the mean absolute
difference of their per-choice log-likelihoods.

Run: PYTHONPATH=. .venv/bin/python benchmarks/lm_eval_compare.py   (~5 min on 2 cores; needs
     `pip install "lm-eval[api]"`, part of the test extra)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, cpu_name, log, save_results, table  # noqa: E402

from swiftkv_jax.io.loading import default_model_path, load_tokenizer  # noqa: E402
from swiftkv_jax.serve.process import ServerProcess  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = "everyday_choice"
MODELS = {"base": None, "smollm2-swiftkv": "smollm2-swiftkv"}  # None: the default model


def run_lm_eval(url: str, tokenizer_dir: Path, out: Path) -> tuple[dict, list[dict]]:
    """lm-eval's results for the task and its samples (one per question), in a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    args = (f"model=m,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer_dir},"
            "num_concurrent=4,max_retries=1,timeout=300")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
                    "--model_args", args, "--tasks", TASK, "--include_path", str(TASKS), "--batch_size", "8",
                    "--output_path", str(out), "--log_samples"], cwd=TASKS, env=env, check=True)
    (results,) = list(out.rglob("results_*.json"))
    (samples,) = list(out.rglob(f"samples_{TASK}_*.jsonl"))
    return (json.loads(results.read_text())["results"][TASK],
            [json.loads(line) for line in samples.read_text().splitlines()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "swiftkv-jax" / "bench" / "lm_eval")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = args.work / "tokenizer"
    load_tokenizer(default_model_path()).save_pretrained(tokenizer_dir)
    res: dict[str, Any] = {"task": TASK, "cpu": cpu_name(), "models": {}}
    loglik: dict[str, np.ndarray] = {}
    picks: dict[str, np.ndarray] = {}
    for name, model in MODELS.items():
        log(f"serving {name} ...")
        with ServerProcess.swiftkv(model, "--served-model-name", "m", "--max-slots", "8",
                                   "--max-length", "512", "--log-level", "warning",
                                   log=args.work / f"serve-{name}.log", timeout=1800) as server:
            results, samples = run_lm_eval(server.url, tokenizer_dir, args.work / name)
        samples.sort(key=lambda s: s["doc_id"])
        ll = np.array([[float(r[0][0]) for r in s["resps"]] for s in samples])
        loglik[name], picks[name] = ll, ll.argmax(axis=1)
        res["models"][name] = {k: v for k, v in results.items() if k.startswith("acc")}
        log(f"  {name}: {res['models'][name]}")
    a, b = MODELS
    res["same_pick"] = float((picks[a] == picks[b]).mean())
    res["mean_abs_loglik_diff"] = float(np.abs(loglik[a] - loglik[b]).mean())
    save_results(args.out, "lm_eval_compare", res, render(res))
    return 0


def render(res: dict[str, Any]) -> str:
    rows = [[name, f"{m['acc,none']:.3f} ± {m['acc_stderr,none']:.3f}",
             f"{m['acc_norm,none']:.3f} ± {m['acc_norm_stderr,none']:.3f}"]
            for name, m in res["models"].items()]
    lines = [f"lm-eval `{res['task']}` (40 local questions, 4 choices, chance 25%) through "
             f"`swiftkv-jax serve`, f32, {res['cpu']}", ""] + table(["model", "acc", "acc_norm"], rows)
    lines += ["", f"Same answer picked: {100 * res['same_pick']:.0f}% of questions; mean |log-likelihood "
              f"difference| per choice: {res['mean_abs_loglik_diff']:.3f} nats."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
