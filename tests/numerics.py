"""Tolerances for comparing two runs that differ only in how float32 sums are ordered (sharded vs
one device, accumulated vs one batch, another CPU): derived from float32 rounding, not tuned.

* Before the optimizer (losses, gradients): reordering a sum of n float32 terms changes it by about
  sqrt(n) * eps relative (rounding errors add like a random walk); `reorder_tolerance` allows 100x
  that, norm-wise over a whole tensor, so entries near zero cannot dominate. A sharding bug (a
  dropped shard, a missing or doubled all-reduce) changes gradients by O(1): orders of magnitude more.
* After Adam: an update is ~ lr * m / sqrt(v), about +-lr for *every* entry in the first steps, even
  one whose gradient is ~0 and whose sign is decided by rounding. So parameters are compared as
  updates in units of the learning rate, and a run agrees when almost every entry's update agrees to
  1% of the learning rate summed over the steps; the rare entries whose near-zero gradient flipped
  sign are allowed (at most 1%). Different gradients move most entries differently.
"""

from __future__ import annotations

import math

import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)
BF16_EPS = 2.0 ** -8  # bfloat16 keeps 8 significant bits: inputs rounded to it differ by this much
MAX_FLIPPED_FRACTION = 0.01  # entries allowed to disagree (near-zero gradients whose sign flipped)
UPDATE_TOLERANCE = 0.01  # in units of the learning rate summed over the compared steps


def reorder_tolerance(num_terms: int) -> float:
    """Norm-wise relative difference allowed between two orderings of float32 sums of `num_terms`."""
    return 100 * F32_EPS * math.sqrt(num_terms)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def relative_norm_error(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over every leaf of two pytrees of the same structure."""
    a, b = _flat(ours), _flat(ref)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def update_agreement(start, ours, ref, lr_total: float) -> dict[str, float]:
    """Compares two runs' parameter updates from the same `start`, in units of `lr_total` (the
    learning rate summed over the steps): the fraction of entries whose updates differ by more
    than UPDATE_TOLERANCE of it, and the mean update of `ref` (> 0: the runs moved at all)."""
    s, a, b = _flat(start), _flat(ours), _flat(ref)
    far = np.abs((a - s) - (b - s)) > UPDATE_TOLERANCE * lr_total
    return {"disagreeing": float(far.mean()), "mean_update_lr": float(np.abs(b - s).mean() / lr_total)}


def updates_agree(report: dict[str, float]) -> bool:
    """Both runs moved (by more than a tenth of the learning rate on average) and agree."""
    return report["mean_update_lr"] > 0.1 and report["disagreeing"] <= MAX_FLIPPED_FRACTION
