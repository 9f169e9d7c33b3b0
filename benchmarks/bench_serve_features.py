"""What the OpenAI fields cost a serving run: structured output (0 / 25 / 100% of requests
constrained to a JSON schema), logprobs (top 5 on every token), penalties, and echo scoring.

One `swiftkv-jax serve` process (SmolLM2-135M-Instruct f32, SwiftKV off) on 127.0.0.1, 8 clients in
a closed loop (benchmarks/load.py, official openai client, streamed), 32 chat requests per case:
ShareGPT questions, 64 new tokens each (eos ignored) for the unconstrained ones; the constrained
ones answer a small JSON schema (they end with their grammar, ~20-40 tokens). Per case: output
tokens/s, TPOT p50 for each kind of request, and the ratio of total tokens/s to the plain case.
The structured-output cases run once per --grammar-decode-steps value (decode steps per engine
step while a constrained request runs: fewer give it its tokens sooner, more keep the others'
loops long), the plain case first and last (its spread is the run's noise). Warm-up compiles
before the server listens. Never run beside another benchmark or distillation.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_serve_features.py   (~15 min on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import MODEL_NAME, chat_requests  # noqa: E402
from common import RESULTS_DIR, CpuShare, cpu_name, log, save_results, table  # noqa: E402
from load import Request, run_load  # noqa: E402

from swiftkv_jax.io.loading import default_model_path, load_tokenizer  # noqa: E402
from swiftkv_jax.serve.process import ServerProcess  # noqa: E402
from swiftkv_jax.train import data  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 20}}}
JSON_FORMAT = {"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": SCHEMA}}}


def case(base: list[Request], constrained_share: float, **extra: Any) -> list[Request]:
    """The workload with every k-th request constrained (k from the share) and `extra` fields on all."""
    every = round(1 / constrained_share) if constrained_share else 0
    out = []
    for i, r in enumerate(base):
        shaped = every and i % every == 0
        out.append(Request(max_tokens=r.max_tokens if not shaped else 128, messages=r.messages,
                           prompt_tokens=r.prompt_tokens, ignore_eos=not shaped,
                           extra={**extra, **(JSON_FORMAT if shaped else {})},
                           group="json" if shaped else "plain"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--grammar-decode-steps", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 8],
                   help="values to measure the structured-output cases at (the first: every case)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "swiftkv-jax" / "bench")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = default_model_path()
    tokenizer = load_tokenizer(gguf)
    base = chat_requests(tokenizer, data.sharegpt_prompts(args.requests), 64, None)
    shaped = {"25% json": case(base, 0.25), "100% json": case(base, 1.0)}
    others = {"logprobs 5": case(base, 0.0, logprobs=True, top_logprobs=5),
              "penalties": case(base, 0.0, frequency_penalty=0.5, presence_penalty=0.5,
                                repetition_penalty=1.2)}
    cpu = CpuShare()
    cpu.start()
    res: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "cpu": cpu_name(), "clients": args.clients,
                           "requests": args.requests, "cases": {}}
    for i, steps in enumerate(args.grammar_decode_steps):
        log(f"starting swiftkv-jax serve (--grammar-decode-steps {steps}) ...")
        with ServerProcess.swiftkv(gguf, "--served-model-name", MODEL_NAME, "--max-slots", str(args.clients),
                                   "--max-length", "2048", "--log-level", "warning", "--warmup", "first",
                                   "--grammar-decode-steps", str(steps), log=args.work / "serve-features.log",
                                   timeout=1800) as server:
            run_load(server.url, MODEL_NAME, case(base[:2], 1.0), concurrency=2)  # grammar library warm-up
            cases = {f"{name}, grammar steps {steps}": reqs for name, reqs in shaped.items()}
            if i == 0:
                cases = {"plain": case(base, 0.0), **others, **cases, "plain (again)": case(base, 0.0)}
            for name, requests in cases.items():
                r = run_load(server.url, MODEL_NAME, requests, concurrency=args.clients)
                res["cases"][name] = r
                errors = f", errors: {r['errors']}" if r["errors"] else ""
                log(f"  {name}: {r['ok']}/{r['requests']} ok, {r['output_tok_s']:.0f} output tok/s, "
                    f"{r['total_tok_s']:.0f} total tok/s{errors}")
    res["others_cpu_share"] = cpu.others()
    save_results(args.out, "serve_features", res, render(res))
    return 0


def render(res: dict[str, Any]) -> str:
    plain = res["cases"]["plain"]["total_tok_s"]
    tpot = lambda r, g: r.get("groups", {}).get(g)
    ms = lambda r: f"{r['tpot_p50_s'] * 1000:.0f} ms" if r and r.get("tpot_p50_s") else "-"
    rows = [[name, f"{r['output_tok_s']:.0f}", f"{r['total_tok_s']:.0f}",
             f"{r['total_tok_s'] / plain:.2f}x", ms(tpot(r, "plain")), ms(tpot(r, "json"))]
            for name, r in res["cases"].items()]
    head = (f"{res['model']}, f32, SwiftKV off, {res['cpu']}; {res['clients']} clients, {res['requests']} "
            f"chat requests per case (other processes used {100 * (res['others_cpu_share'] or 0):.0f}% of "
            "the CPU)")
    return "\n".join([head, ""] + table(["case", "output tok/s", "total tok/s", "vs plain", "TPOT p50 plain",
                                         "TPOT p50 json"], rows))


if __name__ == "__main__":
    sys.exit(main())
