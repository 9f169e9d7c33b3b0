"""Weight-only bfloat16 and int8 against float32 on this CPU: the model's own matmuls.

Decode reads every weight once per step, so fewer bytes per weight should help, if the matmul
reads them as they are. This measures SmolLM2-135M's projection matmuls (all 30 layers' q/k/v/o
and gate/up/down, chained, as benchmarks/common.model_matmuls) at 1 and 8 rows (decode steps)
and 512 rows (a prefill chunk) with the weights stored as:
  float32;
  bfloat16, the input cast to bfloat16 and the product accumulated in float32;
  int8 with one float32 scale per output column, converted to float32 inside the jitted program.
It prints ms per call and the ratio to float32 (> 1: faster), and writes weight_dtypes.json.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_weight_dtypes.py   (about a minute)
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, time_calls, timed  # noqa: E402

import swiftkv_jax as sk  # noqa: E402

ROWS = (1, 8, 512)
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matrices(params: sk.Params) -> list[list[np.ndarray]]:
    """Each layer's seven projections as [in, out] float32 matrices."""
    d = params.config.hidden_size
    out = []
    for layer in params.weights["layers"]:
        ws = [np.asarray(layer[n] if n in layer else layer["mlp"][n], np.float32) for n in NAMES]
        out.append([w.reshape(-1, d) if w.ndim == 3 and w.shape[-1] == d else w.reshape(w.shape[0], -1)
                    for w in ws])
    return out


def stored(mats: list[list[np.ndarray]], kind: str) -> list[list[tuple[jax.Array, jax.Array | None]]]:
    """(weights, per-column scale or None) in the storage `kind`."""
    def one(w: np.ndarray) -> tuple[jax.Array, jax.Array | None]:
        if kind == "int8":
            scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
            return jnp.asarray(np.round(w / scale).astype(np.int8)), jnp.asarray(scale, jnp.float32)
        return jnp.asarray(w, jnp.dtype(kind)), None
    return [[one(w) for w in layer] for layer in mats]


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    if scale is not None:  # int8 weight-only: dequantised in the program
        return jnp.dot(x, w.astype(jnp.float32)) * scale
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


@jax.jit
def chain(x: jax.Array, layers) -> jax.Array:
    for (q, k, v, o, gate, up, down) in layers:
        side = jnp.sum(matmul(x, *k)) + jnp.sum(matmul(x, *v))
        x = x + matmul(matmul(x, *q), *o) \
            + matmul(jax.nn.silu(matmul(x, *gate)) * matmul(x, *up), *down) + 1e-9 * side
    return x


def main() -> int:
    params, _ = sk.load(None, progress=False, tokenizer=False)
    mats = matrices(params)
    results: dict[str, dict[str, float]] = {}
    for kind in ("float32", "bfloat16", "int8"):
        layers = stored(mats, kind)
        nbytes = sum(w.size * w.dtype.itemsize for layer in layers for w, _ in layer)
        results[kind] = {"weight_bytes": nbytes}
        for rows in ROWS:
            x = jnp.full((rows, params.config.hidden_size), 0.01, jnp.float32)
            t = time_calls(lambda: timed(lambda: chain(x, layers).block_until_ready()), 3)
            results[kind][str(rows)] = t.best
        jax.clear_caches()
    print(f"SmolLM2-135M projection matmuls (30 layers), best of 3, {platform.processor() or platform.machine()}")
    print(f"{'weights':9s} {'MB':>5s} " + " ".join(f"{f'{r} rows ms':>12s} {'vs f32':>6s}" for r in ROWS))
    for kind, r in results.items():
        cells = " ".join(f"{1e3 * r[str(n)]:12.1f} {results['float32'][str(n)] / r[str(n)]:5.2f}x" for n in ROWS)
        print(f"{kind:9s} {r['weight_bytes'] / 1e6:5.0f} {cells}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "weight_dtypes.json").write_text(json.dumps(
        {"rows": ROWS, "seconds": results, "jax": jax.__version__, "command": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
