"""Per-device bytes of params and KV cache under swiftkv_jax/sharding/'s partition rules, from configs only.

No weights are loaded and no devices are needed: shapes come from the configs, shards from the
same rules `shard_params` / `init_cache(mesh=...)` apply (including the replicate fallback
when heads do not divide the "model" axis). Prints a markdown table.

    python benchmarks/sharding_memory.py [--rows 8] [--tokens 8192] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from swiftkv_jax.config import ModelConfig
from swiftkv_jax.sharding import memory_per_device

MODELS = {
    "SmolLM2-135M": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                tie_word_embeddings=True),
    "Llama-3.1-8B": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
    "Llama-3.1-70B": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                 num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128),
}
MESHES = ("1x1", "1x8", "2x4", "8x1")  # data x model


def variants(config: ModelConfig):
    """Plain, and SwiftKV with L = N/2 (raised to the next L whose N - L divides by g)."""
    n = config.num_layers
    yield "plain", config
    for g in (1, 2):
        L = n // 2 + (n - n // 2) % g
        yield f"SwiftKV L={L} g={g}", config.replace(num_key_value_layers=L, key_value_group_size=g)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--pool-over-data", action="store_true",
                    help="also split the KV pool's slots over the data axis")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"Per-device GiB, {args.dtype}; cache = {args.rows} rows x {args.tokens} tokens; "
          f"mesh = data x model; pool {'split' if args.pool_over_data else 'replicated'} over data.\n")
    head = " | ".join(f"{m} params | {m} cache" for m in MESHES)
    print(f"| model | variant | {head} |")
    print("|" + "---|" * (2 + 2 * len(MESHES)))
    for name, base in MODELS.items():
        for variant, cfg in variants(base):
            cells = []
            for mesh in MESHES:
                m = memory_per_device(cfg, mesh, dtype, args.rows, args.tokens, args.pool_over_data)
                cells += [gib(m["params"]), gib(m["cache"])]
            print(f"| {name} | {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
