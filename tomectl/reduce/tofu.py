"""ToFu: Token Fusion (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token
Merging", WACV 2024, arXiv 2312.01026).

1. Matching: ToMe's bipartite soft matching on the attention keys, in every layer
   (`tome.bipartite_soft_matching`, reused as it is).
2. Early layers respond non-linearly to interpolated inputs, so averaging two tokens there moves
   the features off the distribution: before the transition layer the matched source token is
   *pruned* (dropped; its destination stays exactly as it was, its size is not added).
3. Later layers are close to linear, so tokens are *merged* there, with MLERP: the size-weighted
   average keeps its direction and takes the largest norm among the merged tokens,
   ``x = avg / |avg| * max_i |x_i|`` (`merge.mlerp_rescale`), instead of the shrunken norm of a
   plain average of dissimilar vectors.

Options: ``transition``, the first merging block; by default the first ``L // 2 + 1`` blocks prune
and the rest merge (blocks 0-6 prune, 7-11 merge on a 12-block ViT), the split public ToFu code
for timm uses. ``norm``: "max" (MLERP as above) or "mean" (the members' size-weighted mean norm,
a sums-only variant kept for comparison).

Note on the divisor: third-party MLERP code rescales the merged token by ``max_norm / |x_dst|``,
the destination's norm *before* merging, which gives the result the norm
``|avg| * max_norm / |x_dst|``, not ``max_norm``. Here the average is divided by its own norm, so
the merged norm is exactly the largest member norm, as the method is described.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from .base import Option, Signals
from .merge import NORMS, Decision
from .tome import ToMe, bipartite_soft_matching


def token_fusion(metric: torch.Tensor, r: int, protected: int, prune: bool,
                 norm: str = "max") -> Optional[Decision]:
    """One ToFu step.

    metric:    [B, N, C] features to match (the keys averaged over heads).
    r:         tokens to remove, 0 <= r <= (N - protected) // 2.
    protected: leading tokens never touched.
    prune:     True: drop each matched source (weight 0), its destination unchanged.
               False: merge each pair with MLERP (norm of the result = the largest member norm).
    Returns a Decision with n_out = N - r, or None for r = 0.
    """
    decision = bipartite_soft_matching(metric, r, protected)
    if decision is None:
        return None
    if not prune:
        return replace(decision, norm=norm)
    return replace(decision, match=replace(decision.match, drop=True))


class ToFu(ToMe):
    """Token Fusion: prune matched tokens before `transition`, MLERP-merge them from it on."""

    name = "tofu"
    options_spec = {
        "transition": Option(None, "int", low=0, nullable=True),  # first merging block; None: L // 2 + 1
        "norm": Option("max", "choice", choices=NORMS),  # MLERP's target norm
    }

    def transition(self, n_layers: int) -> int:
        """First block (0-based) that merges; earlier blocks prune."""
        t = self.options["transition"]
        return n_layers // 2 + 1 if t is None else t

    def cost_regime(self, layer: int, n_layers: int) -> str:
        return "prune" if layer < self.transition(n_layers) else "merge"

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        if signals.layer < 0 or signals.n_layers <= 0:
            raise ValueError("ToFu needs the block index and depth (Signals.layer, n_layers)")
        prune = signals.layer < self.transition(signals.n_layers)
        return token_fusion(self.metric(signals), amount, signals.state.protected, prune,
                            self.options["norm"])
