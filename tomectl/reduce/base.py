"""The small interface every token-reduction method implements.

A method sees what a block offers (`Signals`) and returns a `Decision` (see `merge.py`). It also
states, without any tensor, how many tokens it can remove from a layer and what its own decision
costs in multiply-accumulates, so schedules are validated and FLOPs counted analytically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .merge import Decision, TokenState


@dataclass(frozen=True)
class Signals:
    """What a block hands a method, right after its attention residual.

    x:     [B, N, C] tokens.
    keys:  [B, H, N, d] the attention keys of this block (after q/k norm).
    state: sizes, sources and the protected-token count.
    """

    x: torch.Tensor
    keys: torch.Tensor
    state: TokenState


class ReductionMethod:
    """Base class: subclasses set `name` and implement the three methods."""

    name: str = ""
    #: whether the method merges (uses sizes, proportional attention makes sense) or only prunes
    merges: bool = True

    def capacity(self, n_tokens: int, protected: int) -> int:
        """Most tokens this method can remove at one layer that receives `n_tokens`."""
        raise NotImplementedError

    def overhead_macs(self, n_tokens: int, amount: int, protected: int, head_dim: int) -> int:
        """Multiply-accumulates of the decision itself (matching), per image."""
        return 0

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        """Where each token goes when `amount` tokens are removed at this layer (None: keep all)."""
        raise NotImplementedError
