"""Weights in and out: Hugging Face safetensors, GGUF, orbax checkpoints, the shipped SwiftKV
models, and load(), which takes any of them by path or name."""
