"""Knowledge-preserving distillation of a Llama into a SwiftKV Llama (SWIFTKV.md's recipe).

Teacher = the params with SwiftKV off, student = SwiftKV on: one set of weights. Only the SwiftKV
weights train; they live in a small separate pytree that the loss merges into the frozen params,
so the frozen weights get no gradient and no optimizer state. Layers [0, L) are identical for
both models, so h_L is computed once, without gradient, and shared.
The loop is resumable: the train state is saved with an orbax CheckpointManager, and the batch
of step s is a function of s alone, so a resumed run ends with the same params as a straight one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ..model.forward import final_norm, head_rows, lower_hidden, upper_hidden
from ..model.params import Params, Trainable, merge, trainable_of
from ..sharding import partitioning
from .data import Packed
from .head_kl import head_kl
from .settings import DistillConfig

TrainState = dict[str, Any]  # {"step": int32 [], "trainable": Trainable, "opt_state": ...}


class RunError(ValueError):
    """The output folder holds something this run must not overwrite or cannot resume."""


# --- trainable / frozen: params.trainable_of and params.merge (the schema marks what trains) ---

__all__ = ["DistillConfig", "RunError", "RunResult", "Trainable", "distill", "distill_loss",
           "init_state", "make_optimizer", "make_schedule", "make_train_step", "merge",
           "trainable_of"]


# --- loss ------------------------------------------------------------------------------------

def loss_sums(trainable: Trainable, params: Params, batch: dict[str, jax.Array], temperature: float
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of tau^2 KL(teacher/tau || student/tau), sum of per-position hidden MSE) over the
    supervised positions of `batch`; the teacher and layers [0, L) carry no gradient. The KL
    runs with the LM head fused in, chunk by chunk (head_kl.py: no [B, T, V] logits kept)."""
    h_l = jax.lax.stop_gradient(lower_hidden(params, batch["tokens"]))
    t_h, t_last = jax.lax.stop_gradient(upper_hidden(params, h_l, use_swiftkv=False))
    s_h, s_last = upper_hidden(merge(trainable, params), h_l, use_swiftkv=True)
    w = batch["weights"]
    rows = lambda h: final_norm(params, h).reshape(-1, h.shape[-1])
    kl = head_kl(rows(t_h), rows(s_h), w.reshape(-1), head_rows(params), temperature)
    diff = (s_last - t_last).astype(jnp.float32)
    mse = jnp.mean(diff * diff, axis=-1)
    return kl, jnp.sum(mse * w)


def distill_loss(trainable: Trainable, params: Params, batch: dict[str, jax.Array],
                 config: DistillConfig, count: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, {kl, mse}): both terms are averaged over `count` supervised positions (default:
    those of `batch`), so micro-batches of one accumulated step add up to the step's mean."""
    count = jnp.maximum(batch["weights"].sum() if count is None else count, 1.0)
    kl, mse = loss_sums(trainable, params, batch, config.temperature)
    kl, mse = kl / count, mse / count
    return kl + config.mse_weight * mse, {"kl": kl, "mse": mse}


# --- optimizer and step ----------------------------------------------------------------------

def make_schedule(config: DistillConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up over `warmup_fraction` of the steps, then linear decay to zero."""
    warmup = max(1, round(config.warmup_fraction * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup),
         optax.linear_schedule(config.learning_rate, 0.0, max(1, total_steps - warmup))], [warmup])


def make_optimizer(config: DistillConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam(W) on the schedule (weight decay 0 = Adam)."""
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(make_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                                   weight_decay=config.weight_decay))


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: the SwiftKV weights of `params` in float32 (bf16 params would round small Adam
    updates away) and optimizer state for them only."""
    # Own buffers (the step donates them), float32 whatever the params' dtype.
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable_of(params))
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
            "opt_state": optimizer.init(trainable)}


def make_train_step(config: DistillConfig, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, Params, dict[str, jax.Array]], tuple[TrainState, dict]]:
    """One jitted optimizer step over a batch [accum, B, T] (gradients summed over the micro-
    batches with lax.scan); the train state is donated, so it is updated in place."""

    def step(state: TrainState, params: Params, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        count = batch["weights"].sum()
        grad_fn = jax.value_and_grad(distill_loss, has_aux=True)

        def micro(carry, mb):
            (loss, aux), grads = grad_fn(state["trainable"], params, mb, config, count)
            acc = jax.tree.map(jnp.add, carry, (grads, loss, aux))
            return acc, None

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        init = (zeros, jnp.zeros(()), {"kl": jnp.zeros(()), "mse": jnp.zeros(())})
        (grads, loss, aux), _ = jax.lax.scan(micro, init, batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics

    return jax.jit(step, donate_argnums=0)


def batch_indices(step: int, num_rows: int, config: DistillConfig) -> np.ndarray:
    """Rows [accum, B] of optimizer step `step`: epoch e visits the rows in a permutation seeded
    by (seed, e), so the data order depends on the step alone (resumable)."""
    per_step = config.grad_accum * config.batch_size
    k = step * per_step + np.arange(per_step)
    epochs, offsets = np.divmod(k, num_rows)
    perms = {e: np.random.default_rng([config.seed, int(e)]).permutation(num_rows) for e in set(epochs.tolist())}
    rows = np.array([perms[int(e)][o] for e, o in zip(epochs, offsets)])
    return rows.reshape(config.grad_accum, config.batch_size)


# --- the run folder --------------------------------------------------------------------------

RUN_FILE = "run.json"


def prepare_run_folder(out: Path, identity: dict[str, Any], resume: bool, overwrite: bool) -> bool:
    """Makes `out` ready; returns True when an earlier run should be resumed.

    A folder that holds another run (or anything else) is refused unless `overwrite`; one holding
    this same run is refused unless `resume` or `overwrite`.
    """
    run_file = out / RUN_FILE
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not run_file.exists():
            raise RunError(f"{out} is not empty and holds no distillation run; choose another --out "
                           "or pass --overwrite to delete its contents")
        else:
            old, new = _flat(json.loads(run_file.read_text())), _flat(identity)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise RunError(f"{out} holds a different run (differs in: {', '.join(changed)}); "
                               "choose another --out or pass --overwrite to replace it")
            if not resume:
                raise RunError(f"{out} already holds this run; pass --resume to continue it or "
                               "--overwrite to start again")
            return True
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity, indent=1, sort_keys=True))
    return False


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a refusal can name the setting that differs."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _checkpoint_manager(folder: Path, save_every: int, keep: int) -> Any:
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(folder.absolute(), options=options)


def _log_lines(path: Path, upto: int) -> list[str]:
    """Metric lines of an earlier session up to step `upto` (later ones are redone on resume)."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= upto]


@dataclasses.dataclass
class RunResult:
    """The distilled params and what the run measured."""

    params: Params
    steps: int
    tokens_seen: int
    tokens_per_s: float
    resumed_from: int


def distill(params: Params, data: Packed, config: DistillConfig, out: str | Path, *,
            identity: dict[str, Any] | None = None, resume: bool = False, overwrite: bool = False,
            save_every: int = 100, keep: int = 2, stop_after: int | None = None,
            progress: bool = True, mesh: Mesh | None = None) -> RunResult:
    """Trains the SwiftKV weights of `params` on `data` per `config`, saving into `out`.

    `out` gets run.json (the run's identity), checkpoints/ (orbax, every `save_every` steps and
    at the end, the last `keep`), metrics.jsonl and loss.png. `stop_after` ends the session
    after that many steps (as if interrupted); `resume` continues from the last checkpoint, on
    any mesh. With `mesh`, params and train state are split by the partition rules (tensor
    parallel) and every batch over "data" (data parallel); the math is the same.
    """
    from tqdm.auto import tqdm

    from .plots import plot_metrics

    out = Path(out)
    total = config.num_steps(data.num_rows)
    identity = dict(identity or {}, config=dataclasses.asdict(config), total_steps=total,
                    rows=data.num_rows, data_sum=int(data.tokens.sum()))
    resuming = prepare_run_folder(out, identity, resume, overwrite)
    optimizer = make_optimizer(config, total)
    if mesh is not None:
        params = partitioning.shard_params(params, mesh)
    state = init_state(params, optimizer)
    if mesh is not None:
        state = jax.device_put(state, partitioning.train_state_shardings(state, mesh))
    manager = _checkpoint_manager(out / "checkpoints", save_every, keep)
    start = 0
    if resuming and manager.latest_step() is not None:
        import orbax.checkpoint as ocp
        start = int(manager.latest_step())
        target = partitioning.restore_target(state, jax.tree.map(lambda x: x.sharding, state))
        try:
            state = manager.restore(start, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, TypeError) as e:  # e.g. a state saved by an older layout
            raise RunError(f"the checkpoint of step {start} in {out / 'checkpoints'} does not match "
                           f"this run's train state ({type(e).__name__}: {str(e)[:200]}); it was "
                           "probably written by another version: pass --overwrite to start again"
                           ) from None
    log_path = out / "metrics.jsonl"
    lines = _log_lines(log_path, start)
    log_path.write_text("".join(ln + "\n" for ln in lines))
    tokens_per_step = config.grad_accum * config.batch_size * config.seq_len
    step_fn = make_train_step(config, optimizer)
    schedule = make_schedule(config, total)
    end = total if stop_after is None else min(total, start + stop_after)
    bar = tqdm(total=total, initial=start, desc="distill", unit="step", disable=not progress)
    timed_s, timed_steps = 0.0, 0
    with log_path.open("a") as log:
        for s in range(start, end):
            t0 = time.perf_counter()
            batch = data.rows(batch_indices(s, data.num_rows, config))
            batch = jax.tree.map(jnp.asarray, batch) if mesh is None else \
                partitioning.shard_batch(batch, mesh, batch_axis=1)
            state, metrics = step_fn(state, params, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            dt = time.perf_counter() - t0
            if s > start:  # the first step of a session compiles
                timed_s, timed_steps = timed_s + dt, timed_steps + 1
            tps = tokens_per_step * timed_steps / timed_s if timed_s else 0.0
            record = dict(step=s + 1, lr=float(schedule(s)), tokens=(s + 1) * tokens_per_step,
                          tokens_per_s=round(tps, 1), **metrics)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            manager.save(s + 1, args=_save_args(state), force=(s + 1 == total))
    bar.close()
    manager.wait_until_finished()
    manager.close()
    plot_metrics(log_path, out / "loss.png")
    return RunResult(params=merge(state["trainable"], params), steps=end, tokens_seen=end * tokens_per_step,
                     tokens_per_s=tokens_per_step * timed_steps / timed_s if timed_s else 0.0,
                     resumed_from=start)


def _save_args(state: TrainState) -> Any:
    import orbax.checkpoint as ocp
    return ocp.args.StandardSave(state)
