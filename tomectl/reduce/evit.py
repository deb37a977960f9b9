"""EViT-style attentive pruning (Liang et al., "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations", ICLR 2022).

At a few blocks (the 4th, 7th and 10th of 12, i.e. blocks 3, 6 and 9 counted from 0), between the
attention and the MLP:

1. Attentiveness: the class token's attention to each token, averaged over heads.
2. Keep the k most attentive (unprotected) tokens as they are.
3. Fuse all the others into one token, their average weighted by that attention,
   ``x_fused = sum_i a_i x_i / sum_i a_i``; it is appended after the kept tokens.

So a block that receives n unprotected tokens and keeps k removes ``n - k - 1`` (the fused token
is added): that is the count a schedule gives. Needs a class token. Output order:
[protected, kept (most attentive first), fused].
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserError
from .base import LayerSpec, Option, ReductionMethod, Signals, within
from .merge import Decision, SlotDecision, identity_slots


def attention_order(attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, n] attention -> (order: rank -> token, rank: token -> rank), 0 = most attended, ties by
    position. Two argsorts (TopK with a constant K in ONNX), no scatter."""
    order = attn.argsort(dim=-1, descending=True, stable=True)
    return order, order.argsort(dim=-1, stable=True)


def fusion_weight(attn: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-token averaging weight that makes the merge ``sum a_i x_i / sum a_i`` whatever the sizes.

    `apply_decision` averages with ``weight * size``; dividing the attention by the size cancels
    it (a token's attention already covers all the patches it holds). Clamped away from 0 so an
    underflowed attention never reads as "drop".
    """
    a = attn.clamp_min(torch.finfo(attn.dtype).tiny)
    return a if size is None else a / size.squeeze(-1)


def attentive_fusion(cls_attn: torch.Tensor, keep: int, protected: int,
                     size: Optional[torch.Tensor] = None) -> Decision:
    """Keep the `keep` most attended tokens, fuse the rest into one.

    cls_attn:  [B, N] the class token's attention to every token (protected ones included).
    keep:      unprotected tokens kept, 0 < keep < N - protected - 1.
    protected: leading tokens kept in place.
    size:      [B, N, 1] token sizes or None.
    Returns a Decision with n_out = protected + keep + 1.
    """
    b, n = cls_attn.shape
    n_free = n - protected
    if not 0 < keep < n_free - 1:
        raise ValueError(f"EViT keeps between 1 and {n_free - 2} of {n_free} tokens, asked {keep}")
    a = cls_attn[:, protected:]
    _, rank = attention_order(a)
    kept = rank < keep
    free_slot = torch.where(kept, protected + rank, torch.full_like(rank, protected + keep))
    dst = torch.cat([identity_slots(b, protected, cls_attn.device), free_slot], dim=1)
    fused_w = fusion_weight(a, None if size is None else size[:, protected:])
    w_free = torch.where(kept, torch.ones_like(a), fused_w)
    weight = torch.cat([cls_attn.new_ones(b, protected), w_free], dim=1)
    return SlotDecision(dst=dst, n_out=protected + keep + 1, weight=weight)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Blocks at 1/4, 1/2 and 3/4 of the depth: 3, 6, 9 for 12 blocks (the paper's 4th, 7th, 10th)."""
    return tuple(sorted({round(n_layers * f) for f in (0.25, 0.5, 0.75)}))


class EViT(ReductionMethod):
    """Keep the top-k tokens by class attention, fuse the rest into one, at a few blocks."""

    name = "evit"
    needs_cls_attn = True
    options_spec = {"layers": Option(None, "layers", nullable=True)}  # None: 1/4, 1/2, 3/4 of the depth

    def layers(self, n_layers: int) -> tuple[int, ...]:
        chosen = self.options["layers"]
        return default_layers(n_layers) if chosen is None else within(chosen, n_layers, self.name)

    def capacity(self, n_tokens: int, protected: int) -> int:
        return max(0, n_tokens - protected - 2)  # keep at least one token, plus the fused one

    def overhead_macs(self, spec: LayerSpec) -> int:
        n_tokens, amount, head_dim, num_heads = spec.n_tokens, spec.amount, spec.head_dim, spec.num_heads
        if amount <= 0:
            return 0
        return num_heads * head_dim * n_tokens  # q_cls . K^T, the class token's attention row

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        if signals.cls_attn is None:
            raise UserError("EViT needs the class token's attention; this model gives none")
        state = signals.state
        n_free = signals.x.shape[1] - state.protected
        return attentive_fusion(signals.cls_attn, n_free - amount - 1, state.protected, state.size)
