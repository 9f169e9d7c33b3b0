"""`swiftkv-jax convert`: a model -> our orbax checkpoint or a Hugging Face folder (or only the
SwiftKV tensors of a distilled model), made SwiftKV first if asked."""

from __future__ import annotations

import argparse
from typing import Any

from .common import DTYPES, QUANTIZE_HELP


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="HF folder or GGUF -> our checkpoint (or a HF folder)")
    p.add_argument("source", help="HF folder, .gguf file or converted folder")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--hf", action="store_true",
                   help="write Hugging Face safetensors (llama_swiftkv for SwiftKV models)")
    p.add_argument("--swiftkv-tensors", action="store_true",
                   help="write only the SwiftKV tensors of a distilled model (float16 safetensors, a "
                        "few MB): how swiftkv_jax/models/ ships a model by name")
    p.add_argument("--num-key-value-layers", type=int, default=None,
                   help="make a SwiftKV model: layers >= L take K/V from layer L's input")
    p.add_argument("--group-size", type=int, default=1, help="AcrossKV group size g")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help=QUANTIZE_HELP + "; our checkpoint only (saved and loaded as int8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.loading import load
    from ..io.weights import save_checkpoint, save_hf_folder
    from ..model.swiftkv import to_swiftkv
    from .common import dtype_of

    if args.quantize and (args.hf or args.swiftkv_tensors):
        raise ValueError("--quantize writes our checkpoint (int8 weights); the Hugging Face and "
                         "SwiftKV-tensor outputs are float: leave --quantize out for those")
    params, tokenizer = load(args.source, dtype=dtype_of(args.dtype))
    if args.num_key_value_layers is not None:
        params = to_swiftkv(params, args.num_key_value_layers, args.group_size)
    if args.quantize:  # after the SwiftKV conversion, which averages float weights
        params = params.quantize(args.quantize)
    if args.swiftkv_tensors:
        from ..io.shipped import save_swiftkv_tensors
        path = save_swiftkv_tensors(params, args.out)
        print(f"wrote {path} (the SwiftKV tensors only, float16; load them by the folder's name "
              "once it is under swiftkv_jax/models/)")
        return 0
    if args.hf:
        save_hf_folder(params, args.out, tokenizer)
    else:
        save_checkpoint(params, args.out, tokenizer)
    cfg = params.config
    kind = (f"SwiftKV L={cfg.num_key_value_layers} g={cfg.key_value_group_size}" if cfg.swiftkv
            else "Llama") + (f", {cfg.quantization} weights" if cfg.quantization else "")
    print(f"wrote {args.out} ({'Hugging Face safetensors' if args.hf else 'orbax checkpoint'}, {kind}, "
          f"{params.num_parameters() / 1e6:.1f}M parameters, {'with' if tokenizer else 'no'} tokenizer)")
    return 0
