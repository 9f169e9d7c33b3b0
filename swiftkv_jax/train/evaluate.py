"""How close a SwiftKV student is to its teacher (the same weights with SwiftKV off).

On packed held-out rows: mean KL(teacher || student) per supervised token (temperature 1), top-1
next-token agreement, and the perplexities of student and teacher on the rows' own next tokens
(the teacher's answers, or plain text). Plus greedy answers of both, side by side.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.forward import lower_hidden, upper_logits
from ..model.params import Params
from ..text.tokenization import encode_prompt
from .data import Packed

METRICS = ("kl", "top1", "ppl_student", "ppl_teacher")


@jax.jit
def _eval_sums(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the supervised positions of one batch [B, T]: KL, agreements, both NLLs."""
    h_l = lower_hidden(params, batch["tokens"])
    t_logp = jax.nn.log_softmax(upper_logits(params, h_l, use_swiftkv=False)[0], axis=-1)
    s_logp = jax.nn.log_softmax(upper_logits(params, h_l, use_swiftkv=True)[0], axis=-1)
    w = batch["weights"]
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    agree = (jnp.argmax(t_logp, -1) == jnp.argmax(s_logp, -1)).astype(jnp.float32)
    pick = lambda logp: -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return {"kl": jnp.sum(kl * w), "top1": jnp.sum(agree * w), "nll_student": jnp.sum(pick(s_logp) * w),
            "nll_teacher": jnp.sum(pick(t_logp) * w), "count": jnp.sum(w)}


def evaluate(params: Params, data: Packed, batch_size: int = 4) -> dict[str, float]:
    """Mean KL and top-1 agreement per supervised token, student and teacher perplexity.

    Batches have a fixed shape (the last is padded with weight-0 rows), so this compiles once.
    """
    if not params.config.swiftkv:
        raise ValueError("evaluate compares SwiftKV on and off: give SwiftKV params")
    totals: dict[str, float] = {}
    for start in range(0, data.num_rows, batch_size):
        index = np.arange(start, start + batch_size) % data.num_rows
        batch = data.rows(index)
        batch["weights"] = np.where((np.arange(start, start + batch_size) < data.num_rows)[:, None],
                                    batch["weights"], 0.0).astype(np.float32)
        sums = _eval_sums(params, jax.tree.map(jnp.asarray, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals["count"], 1.0)
    return {"kl": totals["kl"] / n, "top1": totals["top1"] / n,
            "ppl_student": math.exp(totals["nll_student"] / n),
            "ppl_teacher": math.exp(totals["nll_teacher"] / n), "tokens": int(totals["count"])}


def side_by_side(params: Params, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64
                 ) -> list[dict[str, str]]:
    """Greedy answers of the teacher (SwiftKV off) and the student to chat `prompts`."""
    from ..model.swiftkv import swiftkv_off
    from ..runtime.generation import generate

    ids = [encode_prompt(tokenizer, p, chat=True) for p in prompts]
    answers = {}
    for name, p in (("teacher", swiftkv_off(params)), ("student", params)):
        out, _ = generate(p, None, ids, max_new_tokens=max_new_tokens)
        answers[name] = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
    return [{"prompt": q, "teacher": t, "student": s}
            for q, t, s in zip(prompts, answers["teacher"], answers["student"])]


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per model (e.g. init-only, distilled), one column per metric and
    data set, then the teacher's own perplexities."""
    sets = list(next(iter(results.values())).keys())
    head = ["model"]
    for s in sets:
        head += [f"{s} KL", f"{s} top-1", f"{s} ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, cells: list[str]) -> str:
        return "| " + " | ".join([name] + cells) + " |"

    for model, by_set in results.items():
        cells = []
        for s in sets:
            m = by_set[s]
            cells += [f"{m['kl']:.4f}", f"{100 * m['top1']:.1f}%", f"{m['ppl_student']:.3f}"]
        lines.append(row(model, cells))
    first = next(iter(results.values()))
    lines.append(row("teacher", sum([["0", "100%", f"{first[s]['ppl_teacher']:.3f}"] for s in sets], [])))
    return "\n".join(lines)


def format_side_by_side(rows: Sequence[dict[str, str]]) -> str:
    """The greedy answers as readable text blocks."""
    blocks = []
    for r in rows:
        blocks.append(f"### {r['prompt']}\n- teacher: {r['teacher']}\n- student: {r['student']}")
    return "\n\n".join(blocks)
