"""PatchMerger (Renggli et al., "Learning to Merge Tokens in Vision Transformers", arXiv 2202.12015).

At one block (by default the middle one), M learned queries ``W`` [M, C] turn the N unprotected
tokens into M:

    Y = softmax_over_tokens(W . LN(X)^T / sqrt(C)) . X

Each output token is a convex combination of the inputs, with weights that the queries learn.
The layer norm is PatchMerger's own (learned). Only MatMul and Softmax: trivial to export, the same
in training and inference. Protected tokens (class, distillation, registers) pass through untouched;
the paper's models have none. We apply it between the block's attention and MLP, where every
method in tomectl reduces (the paper places it between two blocks). Token sizes follow the mixing
weights (see `merge.py`'s dense decisions); with all sizes 1 before the merge, Y is exactly the
paper's formula.

M is fixed by the schedule: a block receiving n unprotected tokens and removing `amount` keeps
``M = n - amount``. The queries are trained (`tomectl train`); untrained queries are random, so a
model is refused without trained parameters.

Initialisation (this implementation's choice; the paper fine-tunes the whole model from random
queries): with a *frozen* backbone, near-zero random queries give near-uniform weights, every
output token becomes the image's mean token and the frozen later blocks see M copies of one token
(agreement with the unreduced model ~1 %, and little gradient to leave that state). So on its
first training-mode forward the module initialises itself from the data it sees (a data-dependent
init, like weight norm's): the queries become `init_beta` times the unit centres of a few
iterations of spherical k-means over that batch's layer-normed tokens, so each query starts as a
sharp "pick the tokens like this prototype" and the merge starts as a soft clustering. Measured
on DeiT-Tiny (one merger at block 3, 196 -> 84 tokens, 300 val images, before any gradient step):
agreement 1 % from random queries, 27 / 66 / 72 / 73 % with init_beta 20 / 60 / 150 / 400; the
default 100 keeps the softmax trainable. The flag `initialised` is a buffer, so it is saved,
resumed and loaded with the queries.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerSpec, Option, ReductionMethod, Signals, within
from .merge import Decision, MixDecision, protected_mix


class PatchMergerModule(nn.Module):
    """M learned queries and a layer norm: tokens [B, n, C] -> mixing weights [B, M, n]."""

    def __init__(self, embed_dim: int, n_out: int, init_beta: float = 100.0, kmeans_iters: int = 10) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.queries = nn.Parameter(torch.empty(n_out, embed_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.scale = 1.0 / math.sqrt(embed_dim)
        self.init_beta = init_beta
        self.kmeans_iters = kmeans_iters
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialised):
            self.init_from(x)
        return ((self.queries * self.scale) @ self.norm(x).transpose(1, 2)).softmax(dim=-1)

    def no_weight_decay(self) -> set[str]:
        return {"queries"}  # their norm is the softmax's sharpness: decay would flatten it

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Queries <- init_beta * unit centres of spherical k-means over the layer-normed tokens `x`
        [B, n, C] (scores are then ~ init_beta * cosine, since |LN(x)| ~ sqrt(C))."""
        feats = F.normalize(self.norm(x.detach()).reshape(-1, x.shape[-1]).float(), dim=-1)
        m = self.queries.shape[0]
        g = torch.Generator(device="cpu").manual_seed(0)
        centres = feats[torch.randperm(len(feats), generator=g)[:m].to(feats.device)]
        if len(centres) < m:  # fewer tokens than queries in this batch: repeat them
            centres = centres.repeat(math.ceil(m / len(centres)), 1)[:m]
        for _ in range(self.kmeans_iters):
            assign = (feats @ centres.T).argmax(dim=-1)
            sums = torch.zeros_like(centres).index_add_(0, assign, feats)
            counts = torch.bincount(assign, minlength=m)
            centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centres)
        self.queries.copy_(self.init_beta * centres.to(self.queries.dtype))
        self.initialised.fill_(True)


def patch_merger_mix(weights: torch.Tensor, protected: int) -> torch.Tensor:
    """[B, M, n] merger weights over the unprotected tokens -> [B, protected + M, protected + n]
    mixing matrix that keeps the protected tokens in place."""
    return protected_mix(weights, protected)


class PatchMerger(ReductionMethod):
    name = "patchmerger"
    learned = True
    usable_untrained = False
    dense = True
    options_spec = {"layers": Option(None, "layers", nullable=True)}  # None: the middle block

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._layers = self.options["layers"]

    def layers(self, n_layers: int) -> Optional[tuple[int, ...]]:
        if self._layers is None:
            return (n_layers // 2,)
        return within(self._layers, n_layers, self.name)

    def capacity(self, n_tokens: int, protected: int) -> int:
        return max(0, n_tokens - protected - 1)

    def overhead_macs(self, spec: LayerSpec) -> int:
        n_tokens, amount, protected, embed_dim = spec.n_tokens, spec.amount, spec.protected, spec.embed_dim
        if amount <= 0:
            return 0
        n_free = n_tokens - protected
        m = n_free - amount
        n_out = protected + m
        # the queries' scores, then the mixing matmul over all tokens (+1 column: the sizes)
        return m * n_free * embed_dim + n_out * n_tokens * (embed_dim + 1)

    def make_modules(self, specs: Sequence[LayerSpec]) -> dict[int, nn.Module]:
        return {s.layer: PatchMergerModule(s.embed_dim, s.n_tokens - s.protected - s.amount)
                for s in specs if s.amount > 0}

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        module = signals.module
        if module is None:
            raise ValueError("patchmerger needs its learned queries")
        p = signals.state.protected
        weights = module(signals.x[:, p:])  # [B, M, n]
        return MixDecision(n_out=p + weights.shape[1], mix=patch_merger_mix(weights, p))
