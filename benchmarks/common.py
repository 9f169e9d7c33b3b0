"""What two or more benchmark scripts (and notebook 03) use: machine ceilings, timing and CPU-share
helpers, random prompts, and the ours/HF prefill and decode measurements, so no script imports another."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import swiftkv_jax as sk
from swiftkv_jax.runtime.generation import decode, prefill, prefill_chunked
from swiftkv_jax.runtime.request import MAX_STOP_IDS
from swiftkv_jax.runtime.sampling import SamplingParams
from swiftkv_jax.runtime.steps import request_keys

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # where the scripts write by default
DECODE_PROMPT_LEN = 32  # prompt tokens before the timed decode
SEED = 0

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    line = lambda cells: "| " + " | ".join(cells) + " |"
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def save_results(out: Path, name: str, res: dict[str, Any], text: str) -> None:
    """Writes a run's figures (`name`.json) and its table (`name`.md) into `out`, and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(text + "\n")
    print(text)


# ----------------------------------------------------------------------------- timing helpers

@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of one measured operation: the first (warm-up/compile) call and the
    steady-state runs after it."""

    first: float
    runs: list[float]

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def compile(self) -> float:
        """First call minus the best steady call (for jitted code: tracing + XLA compile)."""
        return max(self.first - self.best, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"first_s": self.first, "runs_s": self.runs, "best_s": self.best,
                "median_s": self.median}


def time_calls(call: Callable[[], float], repeats: int) -> Timing:
    """Runs `call` (which returns the seconds of the part it times) once as warm-up, then
    `repeats` times."""
    first = call()
    return Timing(first, [call() for _ in range(repeats)])


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn` takes; `fn` must block until its result is ready."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CpuShare:
    """Share of the machine's CPU time that *other* processes used between start() and stop()
    (Linux /proc/stat); a busy machine makes every number here lower and noisier."""

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        total, idle = sum(fields[:8]) / hz, (fields[3] + fields[4]) / hz
        mine = sum(os.times()[:4])  # this process and its children that have ended (servers)
        return total, total - idle, mine

    def start(self) -> None:
        self._start = self._sample()

    def others(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        total, busy, mine = (e - s for e, s in zip(end, self._start))
        return min(max((busy - mine) / total, 0.0), 1.0)


# ----------------------------------------------------------------------------- machine ceilings

def matmul_flops(dtype: Any, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted [n, n] @ [n, n] matmul in `dtype`."""
    ka, kb = jax.random.split(jax.random.PRNGKey(SEED))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    t = time_calls(lambda: timed(lambda: mm(a, b).block_until_ready()), repeats)
    return 2 * n ** 3 / t.best


def model_matmuls(params: sk.Params, rows: int, head_rows: int, repeats: int = 3) -> tuple[float, float]:
    """(seconds, FLOP/s) of the model's own matmuls alone: every layer's q/k/v/o and gate/up/down
    on a [rows, D] input, chained so nothing is skipped, and the LM head on `head_rows` of them
    (no attention, norms, RoPE or cache). What XLA's dot reaches on exactly these shapes: the
    ceiling a prefill (rows = prompt length, head_rows 1) or a decode step (rows = head_rows =
    batch) is measured against."""
    cfg = params.config
    flat = lambda w: w.reshape(-1, w.shape[-1]) if w.ndim == 3 and w.shape[-1] == cfg.hidden_size \
        else w.reshape(w.shape[0], -1)
    layers = [[flat(layer[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
              + [layer["mlp"][n] for n in ("gate_proj", "up_proj", "down_proj")]
              for layer in params.weights["layers"]]
    tied = "lm_head" not in params.weights
    head = params.weights["embed_tokens"] if tied else params.weights["lm_head"]

    @jax.jit
    def chain(x: jax.Array, layers: list[list[jax.Array]], head: jax.Array) -> jax.Array:
        for q, k, v, o, gate, up, down in layers:
            side = jnp.sum(x @ k) + jnp.sum(x @ v)
            x = x + (x @ q) @ o + (jax.nn.silu(x @ gate) * (x @ up)) @ down + 1e-9 * side
        last = x[-head_rows:]  # the head as the model applies it (a transpose would copy it)
        return jnp.einsum("td,vd->tv", last, head) if tied else last @ head

    x = jnp.full((rows, cfg.hidden_size), 0.01, params.dtype)
    t = time_calls(lambda: timed(lambda: chain(x, layers, head).block_until_ready()), repeats)
    flops = 2 * rows * sum(w.shape[0] * w.shape[1] for layer in layers for w in layer) \
        + 2 * head_rows * head.size
    return t.best, flops / t.best


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best bytes/s of a jitted float32 sum over an `nbytes` array (read once, nothing written)."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32).block_until_ready()
    total = jax.jit(jnp.sum)
    t = time_calls(lambda: timed(lambda: total(x).block_until_ready()), repeats)
    del x
    return nbytes / t.best


# ----------------------------------------------------------------------------- workload

def prefill_flops(cfg: sk.ModelConfig, length: int) -> float:
    """Useful FLOPs of a batch-1 prefill of `length` tokens: every token through the projections,
    MLPs and causal attention (QK^T and PV over the keys at or before each query) of the layers
    that compute their own K/V (all of them without SwiftKV, [0, L) with it) and, with SwiftKV, the
    upper groups' K/V projections of h_L; the last token alone through layers [L, N) and the LM head."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, \
        cfg.num_kv_heads * cfg.head_dim
    per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)
    attention = 2 * 2 * q * length * (length + 1) / 2
    lower, upper = cfg.num_key_value_layers, cfg.num_layers - cfg.num_key_value_layers
    group_kv = upper // cfg.key_value_group_size * length * 2 * 2 * d * kv
    last_token = upper * (per_token + 2 * 2 * q * length)
    return lower * (length * per_token + attention) + group_kv + last_token + 2 * d * cfg.vocab_size


def random_prompts(vocab: int, batch: int, length: int, seed: int = SEED) -> np.ndarray:
    """[batch, length] int32 random token ids (fixed seed: HF and ours get the same prompts)."""
    return np.random.default_rng(seed + 1000 * batch + length).integers(
        0, vocab, (batch, length), dtype=np.int32)


# ----------------------------------------------------------------------------- ours

def emptied(cache: sk.KVCache) -> sk.KVCache:
    """The cache with every row's length 0, so the next prefill starts each row at position 0
    (done here rather than relying on whether `prefill` itself resets or appends)."""
    return dataclasses.replace(cache, lengths=jnp.zeros_like(cache.lengths))


def ours_prefill(params: sk.Params, length: int, new_tokens: int, repeats: int) -> Timing:
    """Times our jitted prefill of a [1, length] prompt into a cache sized for generation."""
    cache = sk.init_cache(params, 1, length + new_tokens)
    tokens = np.zeros((1, cache.max_length), np.int32)
    tokens[0, :length] = random_prompts(params.config.vocab_size, 1, length)[0]
    start_at, lengths = np.zeros((1,), np.int32), np.asarray([length], np.int32)

    def run() -> float:
        nonlocal cache
        cache = emptied(cache)
        cache.lengths.block_until_ready()
        start = time.perf_counter()  # chunked as generate() prefills (pads less than one chunk)
        logits, cache = prefill_chunked(params, cache, tokens, start_at, lengths)
        logits.block_until_ready()
        return time.perf_counter() - start

    return time_calls(run, repeats)


@dataclasses.dataclass
class DecodeResult:
    timing: Timing
    tokens: int  # tokens generated per timed run, all rows together
    row0: list[int]  # the greedy tokens of row 0 (to check that both sides run the same model)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.timing.best


def ours_decode(params: sk.Params, batch: int, new_tokens: int, repeats: int) -> DecodeResult:
    """Times our jitted greedy decode loop alone; an untimed prefill refills the cache first."""
    prompts = random_prompts(params.config.vocab_size, batch, DECODE_PROMPT_LEN)
    cache = sk.init_cache(params, batch, DECODE_PROMPT_LEN + new_tokens)
    tokens = jnp.asarray(prompts)
    num_new = jnp.full((batch,), DECODE_PROMPT_LEN, jnp.int32)
    stop = np.full((batch, MAX_STOP_IDS), -1, np.int32)  # -1 never matches: all tokens are generated
    ones = jnp.ones((batch,), jnp.int32)
    args = (ones, jnp.full((batch,), new_tokens, jnp.int32), SamplingParams.make(),
            request_keys([SEED] * batch, np.arange(batch)), jnp.asarray(stop), jnp.int32(new_tokens - 1))
    generated: list[int] = []
    row0: list[int] = []

    def run() -> float:
        nonlocal cache, row0
        logits, cache = prefill(params, emptied(cache), tokens, num_new)
        logits.block_until_ready()
        start = time.perf_counter()
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy token 0, from prefill
        result, cache = decode(params, cache, None, first, *args, out_len=new_tokens)
        result.counts.block_until_ready()
        elapsed = time.perf_counter() - start
        generated.append(int(np.asarray(result.counts).sum()))
        row0 = [int(first[0])] + np.asarray(result.out)[0, :new_tokens - 1].tolist()
        return elapsed

    timing = time_calls(run, repeats)
    if len(set(generated)) != 1 or generated[0] != batch * new_tokens:
        raise RuntimeError(f"decode generated {generated} tokens, expected {batch * new_tokens}")
    return DecodeResult(timing, generated[0], row0)


# ----------------------------------------------------------------------------- Hugging Face

def hf_prefill(model: Any, prompts: np.ndarray, repeats: int) -> Timing:
    """Times one HF forward over `prompts` with the LM head on the last token only."""
    import torch
    ids = torch.from_numpy(prompts.astype(np.int64))

    def run() -> float:
        with torch.inference_mode():
            return timed(lambda: model(ids, logits_to_keep=1))

    return time_calls(run, repeats)


def hf_decode(model: Any, batch: int, new_tokens: int, repeats: int) -> tuple[DecodeResult, Timing]:
    """Times HF greedy generate() of exactly `new_tokens` tokens per row, minus its prefill.

    Returns the decode result, whose runs are generate() times minus the best time of a separate
    prefill forward over the same prompts, and that prefill's timing."""
    import torch
    prompts = random_prompts(model.config.vocab_size, batch, DECODE_PROMPT_LEN)
    ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(ids)
    pre = hf_prefill(model, prompts, repeats)

    row0: list[int] = []

    def generate(n: int) -> float:
        nonlocal row0
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
            elapsed = time.perf_counter() - start
        if out.shape != (batch, DECODE_PROMPT_LEN + n):
            raise RuntimeError(f"HF generate returned shape {tuple(out.shape)}")
        row0 = out[0, DECODE_PROMPT_LEN:].tolist()
        return elapsed

    first = generate(4)  # short warm-up: generate()'s setup paths, allocator
    runs = [generate(new_tokens) - pre.best for _ in range(repeats)]
    return DecodeResult(Timing(first, runs), batch * new_tokens, row0), pre


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
