"""BAT: Beyond Attentive Tokens (Long et al., "Beyond Attentive Tokens: Incorporating Token Importance
and Diversity for Efficient Vision Transformers", CVPR 2023, arXiv 2211.11315).

At a few blocks (the 4th, 7th and 10th of 12: blocks 3, 6, 9 counted from 0), between attention
and MLP:

1. Decoupling: rank the unprotected tokens by the class token's attention (averaged over heads);
   the top ``k`` are *attentive*, the rest *inattentive*.
2. Importance: the attentive tokens stay.
3. Diversity, inattentive side: a simplified density-peak clustering (DPC-KNN) groups the
   inattentive tokens into ``c`` clusters, each fused into one token by its attention-weighted
   average ``sum a_i x_i / sum a_i``:
   - local density  ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)`` over the ``knn`` nearest tokens,
   - distance to a denser token ``delta_i = min_{j: rho_j > rho_i} d_ij`` (the largest distance
     for the densest token),
   - the ``c`` tokens with the highest ``rho_i * delta_i`` are the centres, every other token joins
     its nearest centre.
4. Diversity, attentive side: the ``m`` most similar pairs of attentive tokens (homogeneous
   tokens) are matched and merged, with ToMe's bipartite matching (`tome.bipartite_soft_matching`)
   over the attentive tokens in position order (ToMe's alternation by position).

Only *which* tokens are attentive depends on the attention values; inside each group tokens are
taken in position order, and every tie (equal scores, equal distances) goes to the lower index, so
the decisions do not hang on how two attention values within rounding of each other are ordered
(PyTorch and onnxruntime differ there by rounding: ordering the attentive tokens by attention made
1.3 % of images take other decisions in onnxruntime than in PyTorch).

Distances ``d`` are between the keys averaged over heads, L2-normalised (the ToMe similarity;
``d^2 = 2 - 2 cos``). All counts (k, m, c) are Python ints fixed by the schedule, so the graph is
static: a block that receives n unprotected tokens and removes ``r`` outputs
``n - r = (k - m) + c`` of them. How r is split (``clusters``: cluster tokens as a fraction of the
output, ``pairs``: attentive pairs merged per cluster token) is an option of this implementation.
Output order: [protected, attentive tokens (after matching, position order), cluster tokens].
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserError
from .base import LayerSpec, Option, ReductionMethod, Signals, within
from .evit import attention_order, default_layers, fusion_weight
from .merge import Decision, SlotDecision, identity_slots, slots_of
from .tome import bipartite_soft_matching


def bat_counts(n_free: int, amount: int, clusters: float, pairs: float) -> tuple[int, int, int]:
    """(k attentive tokens, m attentive pairs merged, c cluster tokens) removing `amount` of `n_free`.

    c = round(clusters * output) clipped to [1, amount]; m = round(pairs * c) clipped so that at
    least c tokens stay inattentive and at most half of the attentive ones merge; k follows from
    ``n_free - amount = (k - m) + c``.
    """
    out = n_free - amount
    if amount <= 0 or out < 2:
        raise ValueError(f"BAT removes between 1 and {n_free - 2} of {n_free} tokens, asked {amount}")
    c = min(max(1, round(clusters * out)), amount, out - 1)
    m = min(round(pairs * c), amount)  # n_in = amount + c - m >= c
    m = min(m, out - c)  # k = out - c + m, at most k // 2 pairs: m <= out - c
    k = out - c + m
    return k, m, c


def density_peak_clusters(metric: torch.Tensor, c: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Simplified DPC-KNN.

    metric: [B, n, d] L2-normalised features; c: clusters (1 <= c <= n); knn: neighbours for density.
    Returns (cluster index [B, n] in 0..c-1, every cluster non-empty; the similarity matrix
    [B, n, n]).
    """
    b, n, _ = metric.shape
    sim = metric @ metric.transpose(1, 2)  # [B, n, n] cosine similarity
    dist2 = (2.0 - 2.0 * sim).clamp_min(0.0)
    eye = torch.eye(n, dtype=torch.bool, device=metric.device)
    k = max(1, min(knn, n - 1))
    if n > 1:
        near = (-dist2.masked_fill(eye, float("inf"))).topk(k, dim=-1).values.neg()  # [B, n, k]
        density = torch.exp(-near.mean(dim=-1))  # [B, n]
    else:
        density = dist2.new_ones(b, n)
    dist = dist2.sqrt()
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j denser than i
    far = dist.amax(dim=(1, 2), keepdim=True).expand(b, n, n)
    delta = torch.where(denser, dist, far).amin(dim=-1)  # densest token: the largest distance
    # the c best scores; ties go to the lower index, as ONNX TopK breaks them (torch.topk promises
    # no order among equal values)
    centres = (density * delta).argsort(dim=-1, descending=True, stable=True)[:, :c]  # [B, c]
    to_centre = dist.gather(2, centres[:, None, :].expand(b, n, c))  # [B, n, c]
    is_centre = torch.arange(n, device=metric.device)[None, :, None] == centres[:, None, :]
    cluster = to_centre.masked_fill(is_centre, -1.0).argmin(dim=-1)  # a centre joins its own cluster
    return cluster, sim


def beyond_attentive_tokens(metric: torch.Tensor, cls_attn: torch.Tensor, amount: int, protected: int,
                            size: Optional[torch.Tensor] = None, clusters: float = 0.3,
                            pairs: float = 0.5, knn: int = 5) -> Decision:
    """One BAT step.

    metric:   [B, N, C] features for clustering and matching (keys averaged over heads).
    cls_attn: [B, N] the class token's attention to every token (protected included).
    amount:   tokens to remove, 1 <= amount <= N - protected - 2.
    size:     [B, N, 1] token sizes or None.
    Returns a Decision with n_out = N - amount.
    """
    b, n, _ = metric.shape
    n_free = n - protected
    k, m, c = bat_counts(n_free, amount, clusters, pairs)
    a = cls_attn[:, protected:]
    feats = metric[:, protected:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    _, rank = attention_order(a)  # token -> rank by attention
    attentive = rank < k
    # Both groups in position order: which tokens are attentive depends on the attention, but the
    # order inside a group does not, so the pairing's A/B alternation (ToMe's, by position) and
    # every tie-break below hang on positions, never on attention values within rounding of each
    # other (which PyTorch and onnxruntime may order differently).
    pos = torch.arange(n_free, device=metric.device).expand(b, n_free)
    by_group = torch.where(attentive, pos, pos + n_free).argsort(dim=-1)  # place -> token: attentive first
    place = by_group.argsort(dim=-1)  # token -> place (int keys, all distinct: no ties)
    c_dim = feats.shape[-1]

    att = feats.gather(1, by_group[:, :k, None].expand(b, k, c_dim))  # [B, k, C] position order
    matched = bipartite_soft_matching(att, m, 0) if m > 0 else None
    att_slot = identity_slots(b, k, metric.device) if matched is None else slots_of(matched, k)  # [B, k]

    inatt = feats.gather(1, by_group[:, k:, None].expand(b, n_free - k, c_dim))  # [B, n_in, C]
    cluster, _ = density_peak_clusters(inatt, c, knn)  # [B, n_in]

    slot_a = att_slot.gather(1, place.clamp(max=k - 1))
    slot_i = (k - m) + cluster.gather(1, (place - k).clamp(min=0))
    free_slot = protected + torch.where(attentive, slot_a, slot_i)
    dst = torch.cat([identity_slots(b, protected, metric.device), free_slot], dim=1)
    w_free = torch.where(attentive, torch.ones_like(a),
                         fusion_weight(a, None if size is None else size[:, protected:]))
    weight = torch.cat([a.new_ones(b, protected), w_free], dim=1)
    return SlotDecision(dst=dst, n_out=n - amount, weight=weight)


class BAT(ReductionMethod):
    """Keep attentive tokens, cluster inattentive ones (DPC-KNN), merge homogeneous attentive pairs."""

    name = "bat"
    needs_cls_attn = True
    options_spec = {
        "layers": Option(None, "layers", nullable=True),  # None: 1/4, 1/2, 3/4 of the depth
        "clusters": Option(0.3, "float", low=0, high=1),  # cluster tokens as a fraction of the output
        "pairs": Option(0.5, "float", low=0, high=1),  # attentive pairs merged per cluster token
        "knn": Option(5, "int", low=1),  # neighbours of the density estimate
    }

    def layers(self, n_layers: int) -> tuple[int, ...]:
        chosen = self.options["layers"]
        return default_layers(n_layers) if chosen is None else within(chosen, n_layers, self.name)

    def capacity(self, n_tokens: int, protected: int) -> int:
        return max(0, n_tokens - protected - 2)

    def overhead_macs(self, spec: LayerSpec) -> int:
        n_tokens, amount = spec.n_tokens, spec.amount
        protected, head_dim, num_heads = spec.protected, spec.head_dim, spec.num_heads
        if amount <= 0:
            return 0
        n_free = n_tokens - protected
        k, m, _ = bat_counts(n_free, amount, self.options["clusters"], self.options["pairs"])
        n_in = n_free - k
        macs = num_heads * head_dim * n_tokens  # q_cls . K^T
        macs += n_in * n_in * head_dim  # DPC similarity among the inattentive tokens
        if m > 0:
            macs += ((k + 1) // 2) * (k // 2) * head_dim  # bipartite matching of the attentive tokens
        return macs

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        if signals.cls_attn is None:
            raise UserError("BAT needs the class token's attention; this model gives none")
        o = self.options
        return beyond_attentive_tokens(
            signals.keys.mean(dim=1), signals.cls_attn, amount, signals.state.protected, signals.state.size,
            clusters=o["clusters"], pairs=o["pairs"], knn=o["knn"],
        )
