"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Section 3 of the paper, in the order it is written:

1. Similarity: the block's attention keys averaged over heads, compared by cosine similarity.
2. Split the (unprotected) tokens alternately into set A (even positions) and set B (odd).
3. Each A token draws one edge to its most similar B token.
4. Keep the r edges with the highest similarity.
5. Merge the r A tokens into their B partners (size-weighted average, in `merge.py`); the other
   A tokens and all B tokens stay. Output: [protected, unmerged A (most similar first), B].

The decision is returned in these terms (`merge.Bipartite`: the A tokens by edge similarity, and
each one's partner), so that the merge can gather the tokens that stay and sum only into B, as the
reference code does; `merge.slots_of` gives the same decision as an output slot per token.

Protected tokens (class, distillation, registers) take no part in matching: they keep their
positions and are never merged. At most half of the unprotected tokens (|A| = ceil(n/2)... capped
at |B| = floor(n/2) merges) can go in one layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import ReductionMethod, Signals
from .merge import Bipartite, Decision


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> Optional[Decision]:
    """Decide which r tokens merge into which.

    metric:    [B, N, C] features to compare (ToMe: keys averaged over heads).
    r:         tokens to remove, 0 <= r <= (N - protected) // 2.
    protected: leading tokens that never merge.
    Returns a Decision with n_out = N - r, or None for r = 0.
    """
    b, n, _ = metric.shape
    n_free = n - protected
    if r <= 0:
        return None
    if r > n_free // 2:
        raise ValueError(f"ToMe can merge at most {n_free // 2} of {n_free} tokens, asked {r}")

    # protected rows are normalised too (unused): one slice fewer. linalg.vector_norm directly: what
    # Tensor.norm ends in, without its Python wrappers (a few us a layer at batch 1)
    m = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
    a, bb = m[:, protected::2], m[:, protected + 1 :: 2]
    scores = a @ bb.transpose(1, 2)  # [B, n_a, n_b] cosine similarity

    best, partner = scores.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True, stable=True)  # rank -> A index
    match = Bipartite(order=order, partner=partner, r=r, protected=protected)
    return Decision(dst=None, n_out=n - r, match=match)


class ToMe(ReductionMethod):
    """Token Merging with the attention keys as similarity."""

    name = "tome"

    def capacity(self, n_tokens: int, protected: int) -> int:
        return (n_tokens - protected) // 2

    def overhead_macs(self, n_tokens: int, amount: int, protected: int, head_dim: int,
                      num_heads: int = 1, embed_dim: int = 0) -> int:
        if amount <= 0:
            return 0
        n_free = n_tokens - protected
        return ((n_free + 1) // 2) * (n_free // 2) * head_dim  # the A x B similarity matmul

    @staticmethod
    def metric(signals: Signals) -> torch.Tensor:
        """[B, N, d]: the attention keys summed over heads. Their cosine similarity is that of the
        keys' average (the paper's metric); the sum is one operator fewer."""
        return signals.keys.sum(dim=1)

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        return bipartite_soft_matching(self.metric(signals), amount, signals.state.protected)
