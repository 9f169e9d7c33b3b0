"""What the engine needs of a grammar (structured output), and nothing more: the engine stays free
of any grammar library; text/grammar.py implements this with llguidance.

A constrained request decodes one token per engine step: before each of its tokens the host asks
its Constraint for the allowed tokens (a bitmask), writes it into the slot's mask on the device,
and the jitted sampler draws only among them (runtime/logits.py); the drawn token is then given
back to the Constraint. Unconstrained requests in the same steps keep their multi-token decode
loops: a constrained row's budget for a call is one token.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Constraint(Protocol):
    """One request's grammar state."""

    def allowed(self) -> np.ndarray:
        """The tokens allowed next: [mask_words(V)] int32, token t is bit t % 32 of word t // 32."""
        ...

    def accept(self, token: int) -> None:
        """Advances past a drawn token (always one `allowed` gave)."""
        ...

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and takes no more tokens (the request then ends)."""
        ...
