"""LTM: learnable token merging (Wang and Yang, "Efficient Visual Transformer by Learnable Token
Merging", arXiv 2407.15219, TPAMI 2025).

What the paper states (abstract, and the authors' released training code): every transformer block
becomes an LTM block whose *mask module* generates token-merging weights; the training objective
adds, with weight 0.1 after a warm-up, a *separable variational upper bound* of the information
bottleneck IB = I(X; X~) - I(X~; Y) built from soft cluster memberships
``phi(x, a) = softmax_a(-beta |x^ - c_a|^2)`` of L2-normalised features to centres c_a, and a
variational decoder Q(y | a):

    IBB = E_i[ sum_a phi(x~_i, a) sum_b phi(x_i, b) log phi(x_i, b) ]   (compression: negative entropy)
        - E_i[ sum_a phi(x~_i, a) log Q(y_i | a) ]                       (relevance: cross-entropy via Q)

The mask module is "designed to reduce" that bound. The paper's body (the module's exact layers)
could not be read when this was written; the reading below is ours (the simplest one consistent
with the above): at each acting block, with n unprotected tokens of which m = n - amount stay,

1. Mask module (`MaskModule`): a learned embedding z = W . LN(x) [n, d] (d = head dim, initialised
   to the block's keys averaged over heads, i.e. ToMe's metric) and a learned score per token.
   The m tokens with the highest ``score_i - redundancy * rho_i`` become the *targets* (output
   slots, TopK with a constant K), where rho_i is, for a token at an even position, its highest
   cosine similarity to a token at an odd position, and 0 at odd positions (ToMe's bipartite
   split): so an untrained module already merges the most redundant tokens as ToMe does, and of
   two near-duplicates it keeps one. Untrained, on 300 shared val images of DeiT-Tiny at ToMe
   r=13's GMACs: 91 % agreement with the unreduced model (ToMe r=13: 93 %); with targets picked by
   the learned score alone it merges *random* tokens: 54 %, and 52 % after one epoch on 256
   training images.
2. Merging weights: each other token spreads itself over the targets,
       A_ia = softmax_a( beta_m * cos(z_i, z_a) + log r_a ),   r = softmax(score over the targets)
   and each target keeps itself (A_aa = 1): a soft clustering with the targets as centres and r as
   the variational marginal. This softmax is exactly the minimiser over A of the bound below
   (rate + beta * distortion, a Gibbs distribution) when the learned metric matches the distortion:
   the sense in which the module "reduces the bound".
3. Merge: x~_a = sum_i A_ia s_i x_i / sum_i A_ia s_i, sizes sum_i A_ia s_i (a dense `mix` decision,
   MatMul and Softmax only; every input's mass is kept, so sizes still add up to the patches).
4. Per-block bound (training mode, left on the module as ``aux_loss``), tokens as samples, each
   weighted by its size w_i:
       rate       = sum_i w_i KL(A_i. || r)                 >= I(X; X~)   (separable, per token)
       distortion = sum_i w_i sum_a A_ia (1 - cos(LN x_i, LN x~_a))  = -E log Q(y | a) + const,
   with Y the token content the next layers consume and Q a von Mises-Fisher decoder centred on the
   merged token (the block has no labels; the trainer distils from the unreduced model instead).
   aux_loss = ib_weight / (acting blocks) * mean_batch(rate + beta * distortion).

Protected tokens (class, distillation, registers) are never merged and keep their places.
Output order: [protected, targets by decreasing score].
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerSpec, Option, ReductionMethod, Signals, within
from .merge import Decision, MixDecision, TokenState, apply_decision, protected_mix

#: inverse temperature of the mask's softmax is learned in log space, kept within [1, MAX_BETA]
MAX_BETA = 100.0


class MaskModule(nn.Module):
    """The mask module of one LTM block: normalised tokens [B, n, C] -> merging weights.

    embed:  z = W . x_norm + b, [B, n, d]; compared by cosine similarity.
    score:  one logit per token; the m best are the targets, and it is their prior log r.
    log_beta: the softmax's inverse temperature (learned, clamped to [1, MAX_BETA]).
    """

    def __init__(self, embed_dim: int, dim: int, tau: float, key_weight: Optional[torch.Tensor] = None,
                 key_bias: Optional[torch.Tensor] = None, num_heads: int = 1, loss_weight: float = 0.0,
                 beta: float = 0.0, redundancy: float = 10.0) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.score = nn.Linear(dim, 1)
        self.log_beta = nn.Parameter(torch.tensor(math.log(1.0 / tau)))
        nn.init.normal_(self.score.weight, std=0.02)  # small but not zero: no tied scores
        nn.init.zeros_(self.score.bias)
        if key_weight is not None and key_weight.shape == (num_heads * dim, embed_dim):
            with torch.no_grad():  # start from ToMe's metric: the keys averaged over heads
                self.embed.weight.copy_(key_weight.reshape(num_heads, dim, embed_dim).mean(0))
                if key_bias is not None:
                    self.embed.bias.copy_(key_bias.reshape(num_heads, dim).mean(0))
                else:
                    self.embed.bias.zero_()
        self.loss_weight = loss_weight  # ib_weight / acting blocks (a plain float: not in state_dict)
        self.beta = beta
        self.redundancy = redundancy
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, x_norm: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
        """x_norm [B, n, C] unprotected tokens, m targets ->
        assign [B, n, m] (rows: where each token goes, summing to 1; a target's row is one-hot on
        itself), log_assign [B, n, m] (the softmax's log-weights), log_prior [B, m] (log r),
        is_target [B, n, 1] (0/1)."""
        z = F.normalize(self.embed(x_norm), dim=-1)  # [B, n, d]
        sim = z @ z.transpose(1, 2)  # [B, n, n] cosine similarities, computed once
        n = sim.shape[1]
        # ToMe's bipartite rule, softened: an even-position token is as redundant as its most similar
        # odd-position token (so of two near-duplicates one is kept, never both merged away)
        odd = torch.arange(n, device=sim.device) % 2 == 1
        nearest_odd = sim.masked_fill(~odd, -2.0).amax(dim=-1)  # [B, n]
        redundancy = torch.where(odd, torch.zeros_like(nearest_odd), nearest_odd)
        prior_logit = self.score(z).squeeze(-1)  # [B, n] learned
        s = prior_logit - self.redundancy * redundancy  # redundant tokens are not targets
        _, idx = s.topk(m, dim=-1, sorted=True)  # targets, best first (TopK with a constant K)
        slots = torch.arange(n, device=s.device)
        onehot = (idx[..., None] == slots).to(z.dtype)  # [B, m, n]: target a is token idx[a]
        is_target = onehot.sum(dim=1)[..., None]  # [B, n, 1]
        sim_t = sim.gather(2, idx[:, None, :].expand(-1, n, -1))  # [B, n, m] token-target similarity
        log_prior = prior_logit.gather(1, idx).log_softmax(dim=-1)  # log r over the targets
        beta = self.log_beta.clamp(0.0, math.log(MAX_BETA)).exp()
        log_assign = (beta * sim_t + log_prior[:, None, :]).log_softmax(dim=-1)
        assign = log_assign.exp() * (1.0 - is_target) + onehot.transpose(1, 2)  # targets keep themselves
        return assign, log_assign, log_prior, is_target


def ltm_mix(assign: torch.Tensor, protected: int) -> torch.Tensor:
    """[B, n, m] assignment of the unprotected tokens -> [B, protected + m, protected + n] mixing
    matrix (`MixDecision.mix`) that keeps the protected tokens in place."""
    return protected_mix(assign.transpose(1, 2), protected)


def ib_bound(x: torch.Tensor, merged: torch.Tensor, assign: torch.Tensor, log_assign: torch.Tensor,
             log_prior: torch.Tensor, is_target: torch.Tensor,
             size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the per-block separable bound, per image ([B] each).

    x [B, n, C] unprotected tokens before the merge; merged [B, m, C] the merged tokens;
    assign [B, n, m] (targets one-hot); log_assign [B, n, m] the soft rows' log-weights;
    log_prior [B, m] log r; is_target [B, n, 1]; size [B, n, 1].
    rate:       sum_i w_i KL(A_i || r) over the non-target tokens (targets are the centres).
    distortion: sum_i w_i sum_a A_ia (1 - cos(LN x_i, LN x~_a)).
    """
    w = size.squeeze(-1) / size.sum(dim=(1, 2))[:, None]  # [B, n]
    kl = (log_assign.exp() * (log_assign - log_prior[:, None, :])).sum(dim=-1)  # [B, n]
    rate = (w * (1.0 - is_target.squeeze(-1)) * kl).sum(dim=-1)
    xn = F.normalize(F.layer_norm(x, x.shape[-1:]), dim=-1)
    mn = F.normalize(F.layer_norm(merged, merged.shape[-1:]), dim=-1)
    distortion = (w * (assign * (1.0 - xn @ mn.transpose(1, 2))).sum(dim=-1)).sum(dim=-1)
    return rate, distortion


class LTM(ReductionMethod):
    """Learnable token merging: a mask module per block gives dense merging weights."""

    name = "ltm"
    learned = True
    usable_untrained = False
    dense = True
    options_spec = {
        # blocks (0-based) that may reduce; None: every block (the paper's LTM blocks)
        "layers": Option(None, "layers", nullable=True),
        "dim": Option(None, "int", low=1, nullable=True),  # mask-module embedding size; None: head dim
        # initial temperature of the merging softmax (then learned, its inverse capped at MAX_BETA)
        "tau": Option(0.02, "float", low=1 / MAX_BETA, high=1.0),
        # weight of a token's redundancy (similarity to its ToMe partner) against its score
        "redundancy": Option(10.0, "float", low=0),
        "ib_weight": Option(0.1, "float", low=0),  # weight of the IB bound (authors' --ib-weight)
        "beta": Option(10.0, "float", low=0),  # IB trade-off: relevance (distortion) against the rate
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._layers = self.options["layers"]

    def layers(self, n_layers: int) -> Optional[tuple[int, ...]]:
        return None if self._layers is None else within(self._layers, n_layers, self.name)

    def capacity(self, n_tokens: int, protected: int) -> int:
        return max(0, n_tokens - protected - 1)  # at least one target stays

    def _dim(self, head_dim: int) -> int:
        return self.options["dim"] or head_dim

    def overhead_macs(self, spec: LayerSpec) -> int:
        n_tokens, amount = spec.n_tokens, spec.amount
        protected, head_dim, embed_dim = spec.protected, spec.head_dim, spec.embed_dim
        if amount <= 0:
            return 0
        d = self._dim(head_dim)
        n = n_tokens - protected
        m = n - amount
        n_out = protected + m
        # embedding, score, all-pairs similarities, then the mixing matmul (+1 column: sizes)
        return n * embed_dim * d + n * d + n * n * d + n_out * n_tokens * (embed_dim + 1)

    def make_modules(self, specs: Sequence[LayerSpec]) -> dict[int, nn.Module]:
        acting = [s for s in specs if s.amount > 0 and (self._layers is None or s.layer in self._layers)]
        weight = self.options["ib_weight"] / max(1, len(acting))
        return {s.layer: MaskModule(s.embed_dim, self._dim(s.head_dim), self.options["tau"], s.key_weight,
                                    s.key_bias, s.num_heads, weight, self.options["beta"],
                                    self.options["redundancy"])
                for s in acting}

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        module = signals.module
        if module is None:
            raise ValueError("ltm needs its mask module at every block where it removes tokens")
        state, x = signals.state, signals.x
        p = state.protected
        n = x.shape[1] - p
        h = signals.x_norm if signals.x_norm is not None else F.layer_norm(x, x.shape[-1:])
        assign, log_assign, log_prior, is_target = module(h[:, p:], n - amount)
        decision = MixDecision(n_out=x.shape[1] - amount, mix=ltm_mix(assign, p))
        module.aux_loss = None
        if module.training:
            merged, _ = apply_decision(decision, x, TokenState(p, size=state.size))
            size = state.sizes(x)[:, p:]
            rate, distortion = ib_bound(x[:, p:], merged[:, p:], assign, log_assign, log_prior, is_target,
                                        size)
            module.aux_loss = module.loss_weight * (rate + module.beta * distortion).mean()
        return decision
