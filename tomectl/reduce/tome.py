"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Section 3 of the paper, in the order it is written, with the details of the authors' public code
(facebookresearch/ToMe), which tomectl's `tome` computes exactly:

1. Similarity: the block's attention keys averaged over heads, compared by cosine similarity.
2. Split *all* tokens alternately by position: set A = positions 0, 2, 4, ..., set B = 1, 3, 5, ...
   Protected (prefix) tokens keep their place in that alternation but take no part in the
   matching: a prefix token in A never merges, one in B is never a destination (the reference's
   -inf score rows and columns). With a class token only (DeiT, ViT) the patch tokens therefore
   start with B at position 1; with class and distillation tokens they start with A at position 2.
3. Each free A token draws one edge to its most similar free B token.
4. Keep the r edges with the highest similarity (ties: the lower A position first).
5. Merge the r A tokens into their B partners (size-weighted average, in `merge.py`).
   Output: [prefix tokens in order, unmerged A, B], the unmerged A tokens in ascending position
   (the reference sorts their indices), B in position order. The next block partitions this new
   sequence by position again, so the order decides every later partition.

Without any prefix token the reference does not sort: the unmerged A tokens stay in edge order
(most similar first), and so do they here. Register tokens are not in the reference; tomectl treats
every prefix token (class, distillation, registers) alike: leading, in order, never merged.

The decision is returned in these terms (`merge.Bipartite`: the matched A tokens by edge
similarity, the unmerged ones in output order, and each one's partner), so that the merge can
gather the tokens that stay and sum only into B, as the reference code does; `merge.slots_of`
gives the same decision as an output slot per token. At most half of the free tokens (the smaller
of |A| and |B|: ``(N - protected) // 2``) can go in one layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import LayerSpec, ReductionMethod, Signals
from .merge import Bipartite, BipartiteDecision, Decision, bipartite_starts


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> Optional[Decision]:
    """Decide which r tokens merge into which.

    metric:    [B, N, C] features to compare (ToMe: keys averaged over heads).
    r:         tokens to remove, 0 <= r <= (N - protected) // 2.
    protected: leading tokens that never merge and are never merged into.
    Returns a Decision with n_out = N - r, or None for r = 0.
    """
    b, n, _ = metric.shape
    n_free = n - protected
    if r <= 0:
        return None
    if r > n_free // 2:
        raise ValueError(f"ToMe can merge at most {n_free // 2} of {n_free} tokens, asked {r}")

    # prefix rows are normalised too (unused): one slice fewer. linalg.vector_norm directly: what
    # Tensor.norm ends in, without its Python wrappers (a few us a layer at batch 1)
    m = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
    a0, b0 = bipartite_starts(protected)  # first free position in A (even) and in B (odd)
    scores = m[:, a0::2] @ m[:, b0::2].transpose(1, 2)  # [B, n_a, n_b] cosine similarity, free tokens

    best, partner = scores.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True, stable=True)  # rank -> A index
    if protected > 0:  # the unmerged A tokens stay in position order (the reference sorts them)
        order = torch.cat([order[:, :r], order[:, r:].sort(dim=-1).values], dim=1)
    match = Bipartite(order=order, partner=partner, r=r, protected=protected)
    return BipartiteDecision(n_out=n - r, match=match)


class ToMe(ReductionMethod):
    """Token Merging with the attention keys as similarity."""

    name = "tome"

    def capacity(self, n_tokens: int, protected: int) -> int:
        return (n_tokens - protected) // 2

    def overhead_macs(self, spec: LayerSpec) -> int:
        n_tokens, amount, protected, head_dim = spec.n_tokens, spec.amount, spec.protected, spec.head_dim
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
