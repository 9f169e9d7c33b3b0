"""`swiftkv-jax serve` under load over the OpenAI API, with llama.cpp's server as the peer, one run.

SmolLM2-135M-Instruct (the shipped GGUF), f32, on this machine's CPU; SwiftKV L = 15 of 30 with
the initialisation-rule weights (speed does not depend on their values). Each server is a real
process on 127.0.0.1 driven by benchmarks/load.py (official openai client, streamed, greedy,
eos ignored, bounded in count and time). Engine warm-up happens before the server listens, so no
figure includes compilation; llama.cpp gets one warm-up request.
  (a) prompt-heavy: random text of 900-1100 tokens in, 32-64 out, 8 clients in a closed loop:
      total tokens/s, TTFT and TPOT p50/p99; SwiftKV L15 vs off, llama.cpp beside them.
  (b) throughput vs concurrency 1..16 on the same workload (plot).
  (c) shared system prompt (~290 tokens) + ShareGPT questions, chat, 8 clients: prefix cache on vs off.
  (d) ShareGPT questions, chat, Poisson arrivals (open loop).

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_serve.py [--peer-python PY]   (~30 min, 2 cores)
     --peer-python: a Python with `llama-cpp-python[server]==0.3.36` (builds llama.cpp, 15-20 min;
     benchmark only): python3 -m venv /tmp/lc && /tmp/lc/bin/pip install "llama-cpp-python[server]==0.3.36"
     --quick: short prompts and few requests (a smoke run of the script, a few minutes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SYSTEM_PROMPT  # noqa: E402
from common import RESULTS_DIR, CpuShare, cpu_name, log  # noqa: E402
from load import Request, run_load  # noqa: E402

from swiftkv_jax.io.loading import default_model_path, load_tokenizer  # noqa: E402
from swiftkv_jax.serve.process import ServerProcess, free_port  # noqa: E402
from swiftkv_jax.train import data  # noqa: E402

FLOOR_SWIFTKV = 1.5  # (a): SwiftKV L15 vs off, total tokens/s at 8 clients
MODEL_NAME = "smollm2"
CONCURRENCY = {1: 4, 2: 4, 4: 8, 8: 16, 16: 16}  # clients -> requests sent


def swiftkv_model(base: Path, layers: int, cache: Path) -> Path:
    """The base GGUF converted to a SwiftKV checkpoint (once; kept in `cache`)."""
    out = cache / f"{base.stem}-swiftkv-L{layers}"
    if not (out / "config.json").exists():
        log(f"converting {base.name} to SwiftKV L={layers} -> {out}")
        subprocess.run([sys.executable, "-m", "swiftkv_jax.cli", "convert", str(base), str(out),
                        "--num-key-value-layers", str(layers)], check=True)
    return out


def random_text(tokenizer: Any, rng: np.random.Generator, n: int) -> tuple[str, int]:
    """Text of about `n` tokens of random ordinary tokens, and its exact token count."""
    ids = rng.integers(1000, 40000, n).tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text = tokenizer.decode(tokenizer.encode(text)[:n], skip_special_tokens=True)
    return text, len(tokenizer.encode(text))


def prompt_heavy(tokenizer: Any, count: int, lengths: tuple[int, int], out: tuple[int, int],
                 seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(count):
        text, n = random_text(tokenizer, rng, int(rng.integers(lengths[0], lengths[1] + 1)))
        reqs.append(Request(max_tokens=int(rng.integers(out[0], out[1] + 1)), prompt=text, prompt_tokens=n))
    return reqs


def chat_requests(tokenizer: Any, questions: list[str], max_tokens: int, system: str | None) -> list[Request]:
    reqs = []
    for q in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        reqs.append(Request(max_tokens=max_tokens, messages=messages, prompt_tokens=n))
    return reqs


class Servers:
    """Starts each server under test as a child process (one at a time: they share 2 cores)."""

    def __init__(self, args: argparse.Namespace, logs: Path):
        self.args, self.logs = args, logs

    def swiftkv(self, model: Path, label: str, *flags: str) -> ServerProcess:
        a = self.args
        log(f"starting swiftkv-jax serve ({label}) ...")
        extra = ("--no-warmup",) if a.quick else ("--warmup", "first")  # no compile inside a figure
        return ServerProcess.swiftkv(model, "--served-model-name", MODEL_NAME, "--max-slots", str(a.max_slots),
                                     "--max-length", "2048", "--chunk-size", str(a.chunk_size),
                                     "--log-level", "warning", *extra, *flags,
                                     log=self.logs / f"serve-{label}.log", timeout=1800)

    def llama_cpp(self, gguf: Path) -> ServerProcess | None:
        if not self.args.peer_python:
            return None
        log("starting llama.cpp (llama-cpp-python server) ...")
        port = free_port()
        server = ServerProcess([self.args.peer_python, "-m", "llama_cpp.server", "--model", str(gguf),
                                "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                                "--n_ctx", "4096", "--n_threads", "2", "--n_batch", "512",
                                "--interrupt_requests", "False"],
                               port, log=self.logs / "llama-cpp.log", ready_path="/v1/models", timeout=600)
        run_load(server.url, MODEL_NAME, [Request(max_tokens=4, prompt="Hello")], concurrency=1)
        return server


def measure(server: ServerProcess, requests: list[Request], label: str, **how: Any) -> dict[str, Any]:
    r = run_load(server.url, MODEL_NAME, requests, **how)
    log(f"  {label}: {r['ok']}/{r['requests']} ok, {r['total_tok_s']:.0f} total tok/s, "
        f"TTFT p50 {r['ttft_p50_s'] or 0:.2f} s p99 {r['ttft_p99_s'] or 0:.2f} s"
        + (f", errors: {r['errors']}" if r["errors"] else ""))
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", default=None, help="python with llama-cpp-python[server] (the peer)")
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--sharegpt", type=int, default=16)
    p.add_argument("--rate", type=float, default=1.0, help="(d): Poisson arrivals per second")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "swiftkv-jax" / "bench")
    args = p.parse_args(argv)
    lengths, outs, sweep = ((900, 1100), (32, 64), dict(CONCURRENCY))
    if args.quick:
        lengths, outs, sweep, args.sharegpt, args.max_slots = (100, 120), (4, 8), {1: 2, 2: 2}, 4, 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = default_model_path()
    tokenizer = load_tokenizer(gguf)
    models = {"L15": swiftkv_model(gguf, 15, args.work), "off": gguf}
    heavy = {c: prompt_heavy(tokenizer, n, lengths, outs, seed=c) for c, n in sweep.items()}
    top = max(sweep)
    a_clients = 8 if 8 in sweep else top
    questions = data.sharegpt_prompts(args.sharegpt)
    shared = chat_requests(tokenizer, questions, 32, SYSTEM_PROMPT)
    sharegpt = chat_requests(tokenizer, questions, 64, None)
    cpu = CpuShare()
    cpu.start()
    servers = Servers(args, args.work)
    res: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "cpu": cpu_name(), "gguf": gguf.name,
                           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "sweep": {}, "prefix": {}, "workload": {"prompt_tokens": lengths, "new_tokens": outs}}
    for name, model in models.items():
        with servers.swiftkv(model, name) as server:
            res["sweep"][name] = {c: measure(server, heavy[c], f"{name}, {c} clients", concurrency=c)
                                  for c in sweep}
            if name == "off":
                res["prefix"]["on"] = measure(server, shared, "shared system prompt, prefix cache on",
                                              concurrency=a_clients)
                res["sharegpt"] = measure(server, sharegpt, f"ShareGPT, Poisson {args.rate}/s", concurrency=None,
                                          rate=args.rate)
    with servers.swiftkv(models["off"], "off-noprefix", "--no-prefix-cache") as server:
        res["prefix"]["off"] = measure(server, shared, "shared system prompt, prefix cache off",
                                       concurrency=a_clients)
    peer = servers.llama_cpp(gguf)
    if peer is not None:
        with peer:
            res["sweep"]["llama.cpp"] = {c: measure(peer, heavy[c], f"llama.cpp, {c} clients", concurrency=c)
                                         for c in (1, a_clients)}
            res["prefix"]["llama.cpp"] = measure(peer, shared, "llama.cpp, shared system prompt",
                                                 concurrency=a_clients)
    res["other_cpu_share"] = cpu.others()
    a = res["sweep"]
    speedup = a["L15"][a_clients]["total_tok_s"] / a["off"][a_clients]["total_tok_s"]
    res["floors"] = [(f"SwiftKV L15 vs off >= {FLOOR_SWIFTKV}x total tokens/s at {a_clients} clients",
                      f"{speedup:.2f}x", speedup >= FLOOR_SWIFTKV)]
    name = "serve_quick" if args.quick else "serve"
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=2))
    text = render(res, a_clients)
    (args.out / f"{name}.md").write_text(text + "\n")
    plot(res, args.out / f"{name}.png")
    print(text)
    return 0


def render(res: dict[str, Any], clients: int) -> str:
    a, w = res["sweep"], res["workload"]
    lines = [f"{res['model']}, f32, CPU ({res['cpu']}); swiftkv-jax serve --max-slots {res['args']['max_slots']} "
             f"--chunk-size {res['args']['chunk_size']} (weights dequantised to f32); llama.cpp: llama-cpp-python "
             f"0.3.36 server on the same GGUF ({res['gguf']}, its own quantised kernels), 2 threads, one "
             "request at a time (its server serialises them)", "",
             f"(a) prompt-heavy: {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} tokens in, "
             f"{w['new_tokens'][0]}-{w['new_tokens'][1]} out, {clients} clients", "",
             "| server | req/s | total tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in a.items():
        r = rows.get(clients) or rows.get(str(clients))
        if r and r["ok"]:
            lines.append(f"| {name} | {r['req_per_s']:.2f} | {r['total_tok_s']:.0f} | {r['ttft_p50_s']:.2f} | "
                         f"{r['ttft_p99_s']:.2f} | {r['tpot_p50_s'] * 1e3:.0f} | {r['tpot_p99_s'] * 1e3:.0f} |")
    lines += ["", "(b) total tokens/s by concurrency (plot: serve.png)", "",
              "| clients | " + " | ".join(a) + " |", "|---" * (len(a) + 1) + "|"]
    for c in sorted({int(c) for rows in a.values() for c in rows}):
        cells = [(rows.get(c) or rows.get(str(c)) or {}).get("total_tok_s") or None for rows in a.values()]
        lines.append(f"| {c} | " + " | ".join(f"{x:.0f}" if x else "-" for x in cells) + " |")
    lines += ["", f"(c) shared system prompt + {res['args']['sharegpt']} ShareGPT questions, chat, 32 out, "
              f"{clients} clients", "", "| | TTFT p50 s | TTFT p99 s | total tok/s |", "|---|---|---|---|"]
    for k, r in res["prefix"].items():
        if not r["ok"]:
            continue
        label = k if k == "llama.cpp" else f"prefix cache {k}"
        lines.append(f"| {label} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['total_tok_s']:.0f} |")
    s = res["sharegpt"]
    lines += ["", f"(d) ShareGPT, Poisson {res['args']['rate']}/s (SwiftKV off): {s['req_per_s']:.2f} req/s, "
              f"TTFT p50 {s['ttft_p50_s']:.2f} s p99 {s['ttft_p99_s']:.2f} s, TPOT p50 {s['tpot_p50_s'] * 1e3:.0f} ms "
              f"p99 {s['tpot_p99_s'] * 1e3:.0f} ms", "", "floors:"]
    lines += [f"  {'PASS' if ok else 'FAIL'}  {n}: {v}" for n, v, ok in res["floors"]]
    if res.get("other_cpu_share") is not None:
        lines.append(f"other processes used {100 * res['other_cpu_share']:.0f}% of the machine's CPU during the run")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in res["sweep"].items():
        cs = sorted(int(c) for c in rows)
        get = lambda c, k: (rows.get(c) or rows.get(str(c)))[k]
        a1.plot(cs, [get(c, "total_tok_s") for c in cs], "o-", label=name)
        a2.plot(cs, [get(c, "ttft_p50_s") for c in cs], "o-", label=name)
    a1.set(xscale="log", xlabel="concurrent clients", ylabel="total tokens/s", title="prompt-heavy load: throughput")
    a2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="TTFT p50, s", title="time to first token")
    for ax in (a1, a2):
        ax.set_xticks(sorted({int(c) for rows in res["sweep"].values() for c in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"swiftkv-jax serve vs llama.cpp, {res['model']} on {res['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
