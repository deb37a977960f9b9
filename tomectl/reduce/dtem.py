"""DTEM: Decoupled Token Embedding for Merging (Lee and Hong, NeurIPS 2024, arXiv 2412.10569).

ToMe matches tokens by the similarity of the attention keys, features the ViT learned for
attention, not for merging. DTEM gives every block a small embedding of its own, decoupled from the
ViT's forward pass, and matches on that instead:

- Embedding: one linear layer on the block's normalised input (what its attention reads), fed a
  *detached* copy so no gradient reaches the backbone; output size = the head dimension (option
  `dim`). We start it as the keys averaged over heads, ``mean_h(W_k^h) x + mean_h(b_k^h)``, which is
  exactly ToMe's similarity feature (for models without q/k norm), so an untrained DTEM *is* ToMe
  and training can only move away from it where that helps.
- Inference (eval mode): ToMe's bipartite soft matching on the learned embedding. The same cost
  plus one small linear layer, the same static shapes, the same exported graph structure.
- Training (train mode): a continuous relaxation of that matching, so the embedding gets
  gradients (`relaxed_matching`): every token stays, a merged source keeps a shrinking size and
  its mass moves to its destinations, and proportional attention (log-size bias) makes a token of
  size ~0 vanish from attention. Details in `relaxed_matching`.

What the paper fixes and what we chose: the decoupled linear embedding, its detached input, the
soft grouping over a few candidate destinations with temperature ~0.1 spread over r steps, soft
(size-weighted) merging and modular training with a frozen ViT follow the paper and its released
code as summarised in METHODS.md. The ToMe initialisation, the per-step soft top-r over sources,
alternating the A/B split with the block's parity and the `presence` mask are this
implementation's choices (the relaxed merge never drops tokens, so the hard method's re-split of
the shrunken sequence has no exact relaxed counterpart).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerSpec, Option, Signals
from .merge import Decision, MixDecision
from .tome import ToMe, bipartite_soft_matching


class DecoupledEmbedding(nn.Module):
    """One block's merging embedding: Linear(C -> dim) on the detached normalised block input."""

    def __init__(self, embed_dim: int, dim: int, key_weight: Optional[torch.Tensor] = None,
                 key_bias: Optional[torch.Tensor] = None, num_heads: int = 1) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, dim)
        if key_weight is not None and key_weight.shape == (num_heads * dim, embed_dim):
            with torch.no_grad():  # start as ToMe: the keys averaged over heads
                self.proj.weight.copy_(key_weight.reshape(num_heads, dim, embed_dim).mean(0))
                if key_bias is not None:
                    self.proj.bias.copy_(key_bias.reshape(num_heads, dim).mean(0))
                else:
                    self.proj.bias.zero_()
        else:
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x_norm: torch.Tensor) -> torch.Tensor:
        return self.proj(x_norm.detach())


def relaxed_matching(metric: torch.Tensor, r: int, protected: int, presence: Optional[torch.Tensor],
                     layer: int = 0, tau: float = 0.1, candidates: int = 4) -> Decision:
    """The differentiable stand-in for `bipartite_soft_matching` used while training.

    metric:     [B, N, D] merging embedding of every token.
    r:          tokens the hard method removes here (how much mass the relaxation moves).
    presence:   [B, N, 1] how much of each token is still its own (None: all 1).
    Returns a dense Decision over the same N tokens (n_out = N):

    1. Split the unprotected tokens alternately into sources A and destinations B (the parity
       alternates with the block, so every token can be a source somewhere).
    2. Each source spreads over its `candidates` most similar live destinations with
       ``w_ab = softmax_b(cos(a, b) / tau + log presence_b)``; its score is ``sum_b w_ab cos(a, b)``.
    3. A soft top-r over the sources, in r steps, each taking one token's worth of mass:
       ``q = softmax(score / tau + log(presence_a - taken_a))``, ``taken = min(taken + q, presence)``;
       ``f_a = taken_a / presence_a`` is the share of source a that merges.
    4. Soft merge: destination b receives ``f_a w_ab`` of each source a (size-weighted average);
       a source keeps ``1 - f_a`` of its size; presence follows.
    """
    b, n, _ = metric.shape
    n_free = n - protected
    m = F.normalize(metric[:, protected:], dim=-1)
    pres = metric.new_ones(b, n_free) if presence is None else presence[:, protected:, 0]
    tiny = torch.finfo(metric.dtype).tiny
    parity = layer % 2
    a_idx = torch.arange(parity, n_free, 2, device=metric.device)
    b_idx = torch.arange(1 - parity, n_free, 2, device=metric.device)
    n_a, n_b = len(a_idx), len(b_idx)
    sim = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # [B, nA, nB]
    logits = sim / tau + pres[:, b_idx].clamp_min(tiny).log()[:, None, :]
    k = min(candidates, n_b)
    if k < n_b:
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    w = logits.softmax(dim=-1)  # [B, nA, nB]
    score = (w * sim).sum(dim=-1)  # [B, nA]

    pa = pres[:, a_idx]
    taken = torch.zeros_like(pa)
    for _ in range(r):  # each step takes one token's worth of mass, softly, from what is left
        q = (score / tau + (pa - taken).clamp_min(tiny).log()).softmax(dim=-1)
        taken = torch.minimum(taken + q, pa)
    frac = (taken / pa.clamp_min(tiny)).clamp(0.0, 1.0 - 1e-4)  # [B, nA] share of a that merges

    # mix in [A..., B...] order, then back to token order
    top = torch.cat([torch.diag_embed(1 - frac), metric.new_zeros(b, n_a, n_b)], dim=2)
    eye_b = torch.eye(n_b, dtype=metric.dtype, device=metric.device).expand(b, n_b, n_b)
    bottom = torch.cat([(frac[..., None] * w).transpose(1, 2), eye_b], dim=2)
    mix_ab = torch.cat([top, bottom], dim=1)  # [B, n_free, n_free]
    inv = torch.argsort(torch.cat([a_idx, b_idx]))
    mix_free = mix_ab[:, inv][:, :, inv]
    mix = torch.zeros(b, n, n, dtype=metric.dtype, device=metric.device)
    mix[:, :protected, :protected] = torch.eye(protected, dtype=metric.dtype, device=metric.device)
    mix[:, protected:, protected:] = mix_free

    new_pres = pres.clone()
    new_pres[:, a_idx] = pa * (1 - frac)
    presence_out = torch.cat([metric.new_ones(b, protected), new_pres], dim=1)[..., None]
    return MixDecision(n_out=n, mix=mix, presence=presence_out)


class DTEM(ToMe):
    """Token merging on a learned, decoupled embedding (ToMe's matching, ToMe's capacity)."""

    name = "dtem"
    learned = True
    usable_untrained = True  # starts as ToMe
    trains_with_prop_attn = True
    options_spec = {
        "dim": Option(None, "int", low=1, nullable=True),  # embedding size; None: the head dim
        "tau": Option(0.1, "float", low=0, low_open=True),  # temperature of the relaxed matching
        "candidates": Option(4, "int", low=1),  # B candidates per A token in the relaxed matching
    }

    def _dim(self, head_dim: int) -> int:
        return self.options["dim"] or head_dim

    def overhead_macs(self, spec: LayerSpec) -> int:
        n_tokens, amount = spec.n_tokens, spec.amount
        protected, head_dim, embed_dim = spec.protected, spec.head_dim, spec.embed_dim
        if amount <= 0:
            return 0
        dim = self._dim(head_dim)
        n_free = n_tokens - protected
        return n_tokens * embed_dim * dim + ((n_free + 1) // 2) * (n_free // 2) * dim

    def make_modules(self, specs: Sequence[LayerSpec]) -> dict[int, nn.Module]:
        # every block gets an embedding (whatever the schedule), so one trained set serves any r
        return {
            s.layer: DecoupledEmbedding(s.embed_dim, self._dim(s.head_dim), s.key_weight, s.key_bias,
                                        s.num_heads)
            for s in specs
        }

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        module = signals.module
        if module is None or signals.x_norm is None:
            raise ValueError("dtem needs its learned embedding and the block's normalised input")
        metric = module(signals.x_norm)
        protected = signals.state.protected
        if module.training:
            return relaxed_matching(metric, amount, protected, signals.state.presence, signals.layer,
                                    self.options["tau"], self.options["candidates"])
        return bipartite_soft_matching(metric, amount, protected)
