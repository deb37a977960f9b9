"""Apply a token-reduction decision to tokens, their sizes and their sources.

Every method in `tomectl.reduce` only *decides* where each token goes (a `Decision`); this module
is the one place that carries the decision out. Shapes:

- ``x``       [B, N, C]   tokens
- ``size``    [B, N, 1]   how many original patches each token stands for (None: all ones)
- ``source``  [B, N, N0]  which original tokens each token holds (None: not tracked)

The merged token of an output slot is the size-weighted average of the inputs sent there,
``x_j = sum_i w_i s_i x_i / sum_i w_i s_i``, built from sums and counts only. That is what the
ONNX exporters and TensorRT handle correctly: ``scatter_reduce(reduce="mean")`` is exported by
torch's new exporter as an unreduced ScatterElements without any error, and gives wrong numbers.

Two formulations give the same numbers:

- ``"scatter"``: ``index_add`` of the rows of ``w s x`` and of ``w s`` into the output slots, with
  the batch folded into one flat row index (ONNX ScatterND with reduction=add; see `_add_rows`).
  Bipartite decisions take the faster gather form below.
- ``"onehot"``: an assignment matrix ``A[b, i, j] = (dst[b, i] == j)`` built from an Equal
  against a constant range, then ``A^T (w s x)``: MatMul only, no Scatter at all (TensorRT parses
  it without plugins).

A *dense* decision gives a mixing matrix instead of slots (learned methods: PatchMerger's
queries, LTM's masks, DTEM's relaxed merge while training): ``mix[b, j, i] >= 0`` is how much of
input token i goes to output j, and ``x_j = sum_i mix_ji s_i x_i / sum_i mix_ji s_i`` with size
``sum_i mix_ji s_i``; a hard assignment is the special case of a 0/1 matrix. MatMul only.

A *bipartite* decision (`Bipartite`: ToMe's matching, and ToFu and DTEM which reuse it) is kept in
its own terms instead: the matched A tokens in order of their edge's similarity, the unmatched ones
in output order, and each one's partner in B. Its scatter formulation works on flat rows (batch
folded in): each output slot starts as a row gather of its own token (prefix, unmatched A, B),
and each matched A token i moves its partner j by ``s_i (x_i - x_j) / S_j`` (``S_j`` the slot's
summed size, one ``index_add`` of the r sizes): the moves add up to exactly the size-weighted
average, only the r matched rows are touched twice, and a slot that receives nothing is a bit-exact
copy of its token. No slot index (no sort of the ranks) and no zero-filled sum over all tokens:
on DeiT-S at batch 8 the merge costs about a third less than the slot form's ``index_add`` over
every row. The onehot formulation (and a pruning mask under it)
uses the same decision as slots (`slots_of`).

A decision may ask for a norm-preserving merge (``norm="max"``, ToFu's MLERP): the size-weighted
average keeps its direction and is rescaled to the largest norm among the tokens sent to the slot,
``x_j = avg_j * max_i |x_i| / |avg_j|``. The maximum is a ``scatter_reduce(amax)`` (ONNX
ScatterElements, reduction=max) in the scatter formulation, and a masked ReduceMax over the
assignment matrix in the onehot one. A slot holding one token keeps its own norm (up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

FORMULATIONS = ("scatter", "onehot")
NORMS = ("max", "mean")


def bipartite_starts(protected: int) -> tuple[int, int]:
    """First free position of set A (even positions) and of set B (odd) when the first `protected`
    tokens are prefix tokens: the reference's alternation over *all* tokens by position."""
    odd = protected % 2
    return protected + odd, protected + 1 - odd


@dataclass(frozen=True)
class Bipartite:
    """ToMe's bipartite matching, in its own terms (see `tome.bipartite_soft_matching`).

    All tokens alternate by position into A (even) and B (odd); the prefix tokens (the first
    `protected`) take no part. Every free A token has a most similar free B token, and the `r` A
    tokens with the most similar partners merge into them. The output layout is [prefix tokens,
    unmatched A (in the order of `order`), free B (position order)].

    order:     [B, n_a] int64, indices into the free A tokens: the first `r` are the matched ones,
               highest edge similarity first; the rest are the unmatched ones in their output order
               (ascending position when there are prefix tokens, as the reference keeps them; edge
               order without any).
    partner:   [B, n_a] int64, each A token's most similar token in the free B set (index into B).
    r:         tokens removed (A tokens matched).
    protected: leading (prefix) tokens that stay in place.
    drop:      the matched A tokens are dropped (pruning: their partners stay exactly as they were,
               sizes unchanged) instead of averaged in (ToFu's early layers).
    """

    order: torch.Tensor
    partner: torch.Tensor
    r: int
    protected: int
    drop: bool = False

    @property
    def a_first(self) -> bool:
        """Whether the first free token (position `protected`) is in A."""
        return self.protected % 2 == 0

    def slots(self, n: int, rank: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same decision as output slots: [B, n] (`SlotDecision.dst`) for `n` input tokens.
        `rank`: `self.rank()` where the caller has it already."""
        b, n_a = self.order.shape
        p, r = self.protected, self.r
        n_b = n - p - n_a
        rank = self.rank() if rank is None else rank
        b_base = p + n_a - r
        # A token: its partner's slot if among the r best edges, else its place among the unmatched
        # ones. B tokens keep their order after the unmatched A tokens.
        a_slot = torch.where(rank < r, self.partner + b_base, rank + (p - r))
        b_slot = torch.arange(b_base, b_base + n_b, device=self.order.device).expand(b, n_b)
        return self._interleave(identity_slots(b, p, self.order.device), a_slot, b_slot, n)

    def matched(self, n: int, rank: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, n] bool: the A tokens that merge into (or are dropped for) a B token."""
        hit = (self.rank() if rank is None else rank) < self.r
        none = hit.new_zeros(hit.shape[0], n - self.protected - hit.shape[1])
        return self._interleave(hit.new_zeros(hit.shape[0], self.protected), hit, none, n)

    def rank(self) -> torch.Tensor:
        """[B, n_a]: each A token's place in `order` (0..r-1 matched, r.. its place among the
        unmatched), by one stable sort."""
        return self.order.argsort(dim=-1, stable=True)

    def _interleave(self, prot: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
        """[B, p], [B, n_a], [B, n_b] -> [B, n] in token order (free tokens alternate, A at even
        positions, B at odd ones), without any scatter."""
        first, second = (a, b) if self.a_first else (b, a)
        if second.shape[1] < first.shape[1]:  # one free token more in the first set: a filler, cut off
            second = torch.cat([second, first[:, -1:]], dim=1)
        free = torch.stack([first, second], dim=-1).reshape(a.shape[0], -1)[:, : n - self.protected]
        return torch.cat([prot, free], dim=1)


@dataclass(frozen=True)
class Decision:
    """Where each input token goes: one of three kinds, `SlotDecision`, `BipartiteDecision` or
    `MixDecision`. n_out: number of output tokens (a Python int, so shapes stay static)."""

    n_out: int


@dataclass(frozen=True, kw_only=True)
class SlotDecision(Decision):
    """A hard decision as an output slot per input token.

    dst:    [B, N] int64, the output slot (0..n_out-1) of each input token. Every slot receives
            at least one token with a non-zero weight.
    weight: [B, N] optional extra averaging weight per input token (multiplies its size). A
            weight of exactly 0 *drops* the token: it neither moves the average nor adds its
            size to the destination (pruning).
    norm:   None for the plain (weighted) average; "max" rescales each merged token to the largest
            norm among its (non-dropped) members (ToFu's MLERP), "mean" to their mean norm.
    """

    dst: torch.Tensor
    weight: Optional[torch.Tensor] = None
    norm: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class BipartiteDecision(Decision):
    """ToMe's matching in its own terms (`Bipartite`: A tokens by edge similarity and each one's
    partner), merged by the gather form in the scatter formulation; `norm` as in `SlotDecision`."""

    match: Bipartite
    norm: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class MixDecision(Decision):
    """A dense decision (learned methods; DTEM's relaxed merge while training).

    mix:      [B, n_out, N] merge weights (see the module docstring); every output row must hold
              some weight.
    presence: [B, n_out, 1] for relaxed (training-time) merges that keep every token: how much of
              each output token is still its own (1: untouched, near 0: merged away). Carried in
              the TokenState for the next relaxed decision; None for hard decisions.
    """

    mix: torch.Tensor
    presence: Optional[torch.Tensor] = None


def slots_of(decision: Decision, n: int) -> torch.Tensor:
    """[B, n] output slot of each of the `n` input tokens, for a slot or a bipartite decision."""
    if isinstance(decision, SlotDecision):
        return decision.dst
    if isinstance(decision, BipartiteDecision):
        return decision.match.slots(n)
    raise ValueError("a dense (mix) decision has no slots")


def _as_slots(decision: BipartiteDecision, x: torch.Tensor) -> SlotDecision:
    """A bipartite decision rewritten in the slot form (dropping = a zero weight)."""
    m, n = decision.match, x.shape[1]
    rank = m.rank()
    weight = (~m.matched(n, rank)).to(x.dtype) if m.drop else None
    return SlotDecision(n_out=decision.n_out, dst=m.slots(n, rank), weight=weight, norm=decision.norm)


@dataclass(frozen=True)
class TokenState:
    """Per-forward bookkeeping that travels with the tokens through the blocks.

    protected: the first `protected` tokens (class, distillation, register tokens) are never
               merged or pruned and keep their positions.
    size:      [B, N, 1] float, or None while every token is still a single patch.
    source:    [B, N, N0] float 0/1 membership of the original tokens, or None (not tracked).
    presence:  [B, N, 1] relaxed merging only (see `MixDecision.presence`), else None.
    """

    protected: int
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    presence: Optional[torch.Tensor] = None

    @staticmethod
    def start(x: torch.Tensor, protected: int, track_source: bool = False) -> "TokenState":
        source = None
        if track_source:
            b, n, _ = x.shape
            source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
        return TokenState(protected=protected, source=source)

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, 1] sizes, materialising ones where nothing was merged yet."""
        if self.size is not None:
            return self.size
        return x.new_ones(x.shape[0], x.shape[1], 1)

    def attn_bias(self) -> Optional[torch.Tensor]:
        """Proportional attention (ToMe, Eq. 1): log(size) of each *key*, added to the scores.

        Returns [B, 1, 1, N] for ``F.scaled_dot_product_attention``'s additive mask, or None while
        all sizes are 1 (log 1 = 0), so an unreduced model runs exactly the unpatched kernel.
        """
        if self.size is None:
            return None
        b, n, _ = self.size.shape
        return self.size.log().reshape(b, 1, 1, n)  # [B, N, 1] -> [B, 1, 1, N]: one Reshape in ONNX


def apply_decision(
    decision: Decision,
    x: torch.Tensor,
    state: TokenState,
    formulation: str = "scatter",
) -> tuple[torch.Tensor, TokenState]:
    """Carry out `decision` on tokens `x` [B, N, C]; returns the new tokens [B, n_out, C] and state."""
    if isinstance(decision, MixDecision):
        return _apply_mix(decision, x, state)
    if not isinstance(decision, (SlotDecision, BipartiteDecision)):
        raise TypeError(f"not a decision: {type(decision).__name__}")
    if decision.norm is not None and decision.norm not in NORMS:
        raise ValueError(f"unknown merge norm {decision.norm!r}; choose one of {NORMS}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown merge formulation {formulation!r}; choose one of {FORMULATIONS}")
    if isinstance(decision, BipartiteDecision):
        if formulation == "scatter":
            return _apply_bipartite(decision, x, state)
        decision = _as_slots(decision, x)
    size = state.sizes(x)
    keep = None if decision.weight is None else (decision.weight != 0).to(x.dtype)[..., None]
    w = size if decision.weight is None else size * decision.weight[..., None]
    kept_size = size if keep is None else size * keep
    unit = state.size is None and decision.weight is None  # every weight is 1: x * w == x exactly

    member_norm = None
    if decision.norm is not None:
        member_norm = x.norm(dim=-1, keepdim=True)  # [B, N, 1]
        if keep is not None:
            member_norm = member_norm * keep  # dropped tokens do not count (norms are >= 0)
    if decision.norm == "mean":  # the members' (weighted) mean norm: one more column in the sums
        x = torch.cat([x, member_norm], dim=-1)

    if formulation == "scatter":
        b, n, c = x.shape
        # Row sums into the output slots: one flat row index per token, batch folded into it.
        rows = decision.dst.reshape(-1) if b == 1 else (
            decision.dst + torch.arange(b, device=x.device)[:, None] * decision.n_out
        ).reshape(-1)
        num = _add_rows(x if unit else x * w, rows, b, decision.n_out)
        den = _add_rows(w, rows, b, decision.n_out)
        new_size = den if decision.weight is None else _add_rows(kept_size, rows, b, decision.n_out)
        source = None
        if state.source is not None:
            source = _add_rows(state.source if keep is None else state.source * keep, rows, b, decision.n_out)
        if decision.norm == "max":
            idx = decision.dst[..., None]
            target = x.new_zeros(b, decision.n_out, 1).scatter_reduce(1, idx, member_norm, reduce="amax")
    else:  # onehot
        slots = torch.arange(decision.n_out, device=x.device, dtype=decision.dst.dtype)
        assign_t = (decision.dst[..., None] == slots).to(x.dtype).transpose(1, 2)  # [B, n_out, N]
        num = assign_t @ (x * w)
        den = assign_t @ w
        new_size = den if decision.weight is None else assign_t @ kept_size
        source = None
        if state.source is not None:
            source = assign_t @ (state.source if keep is None else state.source * keep)
        if decision.norm == "max":
            target = (assign_t * member_norm.transpose(1, 2)).amax(dim=-1, keepdim=True)  # [B, n_out, 1]
    out = num / den
    if decision.norm == "mean":
        out, target = out[..., :-1], out[..., -1:]
    if member_norm is not None:
        out = mlerp_rescale(out, target)
    return out, replace(state, size=new_size, source=source, presence=None)


def _apply_bipartite(decision: BipartiteDecision, x: torch.Tensor,
                     state: TokenState) -> tuple[torch.Tensor, TokenState]:
    """The scatter formulation of a bipartite decision, on flat rows (the batch folded in).

    Every output slot starts as a copy of one input token (prefix, unmatched A, B: one row
    gather), and each matched A token i then moves its partner j by ``s_i (x_i - x_j) / S_j``, with
    ``S_j = s_j + sum of the s_i merged into j``: the sum of those moves gives exactly the
    size-weighted average ``(s_j x_j + sum_i s_i x_i) / S_j``, while only the r matched rows are
    read twice. A slot that receives nothing is an exact copy of its token.
    """
    m = decision.match
    b, n, c = x.shape
    p, r = m.protected, m.r
    n_out = n - r
    prot_rows, a_rows, b_rows, into_rows = _bipartite_rows(b, n, p, r, x)
    a_sorted = a_rows.gather(1, m.order)  # flat input rows of the A tokens, most similar edge first
    # Flat row (image * n + token) of each output slot's own token: [prefix, unmatched A, B].
    keep = torch.cat([prot_rows, a_sorted[:, r:], b_rows], dim=1).reshape(-1)
    x_flat = x.reshape(b * n, c)
    y = x_flat.index_select(0, keep)
    size = state.size
    size_flat = None if size is None else size.reshape(b * n, 1)
    s_keep = None if size is None else size_flat.index_select(0, keep)
    src_flat = None if state.source is None else state.source.reshape(b * n, -1)

    def done(out, new_size, source):
        source = None if source is None else source.view(b, n_out, -1)
        new_size = None if new_size is None else new_size.view(b, n_out, 1)
        return out.view(b, n_out, c), TokenState(state.protected, new_size, source, None)

    if m.drop:  # pruning: the matched A tokens vanish; B tokens and sizes stay exactly as they were
        return done(y, s_keep, None if src_flat is None else src_flat.index_select(0, keep))

    src = a_sorted[:, :r].reshape(-1)  # flat input rows of the matched A tokens
    into = into_rows.gather(1, m.partner.gather(1, m.order[:, :r])).reshape(-1)  # flat output rows they join
    x_src = x_flat.index_select(0, src)
    if size is None:
        den = x.new_ones(b * n_out, 1).index_add(0, into, x.new_ones(b * r, 1))
        share = den.index_select(0, into).reciprocal()  # s_i / S_j with every s = 1
    else:
        s_src = size_flat.index_select(0, src)
        den = s_keep.index_add(0, into, s_src)
        share = s_src / den.index_select(0, into)  # s_i / S_j
    out = y.index_add(0, into, (x_src - y.index_select(0, into)) * share)
    if decision.norm is not None:
        if decision.norm == "max":
            target = y.norm(dim=-1, keepdim=True).scatter_reduce(  # ONNX ScatterElements (max)
                0, into[:, None], x_src.norm(dim=-1, keepdim=True), reduce="amax")
        else:  # the members' size-weighted mean norm, by the same moves
            target = y.norm(dim=-1, keepdim=True)
            move = (x_src.norm(dim=-1, keepdim=True) - target.index_select(0, into)) * share
            target = target.index_add(0, into, move)
        out = mlerp_rescale(out, target)
    source = None
    if src_flat is not None:  # membership adds up
        source = src_flat.index_select(0, keep).index_add(0, into, src_flat.index_select(0, src))
    return done(out, den, source)


_ROWS: dict = {}


def _bipartite_rows(b: int, n: int, p: int, r: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Constant flat-row tables of a bipartite merge of `b` images of `n` tokens ([B, k] each):
    the prefix tokens' input rows, the free A tokens' and the free B tokens' input rows (by A / B
    index), and the B tokens' output rows (by B index; output layout [prefix, n_a - r unmatched A,
    B]).

    Built once per shape and device in eager use (a merge runs a dozen tiny operators, and each
    arange costs as much as one); built afresh while tracing (export, compile), where they become
    graph constants."""
    key = (b, n, p, r, x.device)
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    eager = type(x) is torch.Tensor and not tracing
    rows = _ROWS.get(key) if eager else None
    if rows is None:
        with torch.inference_mode(False):  # plain tensors: usable under autograd too
            a0, b0 = bipartite_starts(p)
            n_a, n_b = len(range(a0, n, 2)), len(range(b0, n, 2))
            tok = torch.arange(n, device=x.device)
            out_b = torch.arange(p + n_a - r, n - r, device=x.device)
            if b > 1:
                tok = tok + torch.arange(b, device=x.device)[:, None] * n
                out_b = out_b + torch.arange(b, device=x.device)[:, None] * (n - r)
            tok = tok.expand(b, n)
            rows = (tok[:, :p].contiguous(), tok[:, a0::2].contiguous(), tok[:, b0::2].contiguous(),
                    out_b.expand(b, n_b).contiguous())
        if eager:
            if len(_ROWS) > 256:
                _ROWS.clear()
            _ROWS[key] = rows
    return rows


def _add_rows(t: torch.Tensor, rows: torch.Tensor, batch: int, n_out: int) -> torch.Tensor:
    """Sum the rows of `t` [B, N, K] into [B, n_out, K] at the flat row indices `rows` [B * N].

    ``index_add`` over whole rows: on CPU about 9x faster than ``scatter_add`` along dim 1 with an
    index expanded to [B, N, K] (which computes an offset per element), and exported as ONNX
    ScatterND (reduction=add) on [B * N] row indices, which onnxruntime runs about 10x faster than
    ScatterElements with an expanded index. The sums are the same (each slot accumulates its
    tokens in token order, starting from zero).
    """
    k = t.shape[-1]
    out = t.new_zeros(batch * n_out, k).index_add_(0, rows, t.reshape(batch * t.shape[1], k))
    return out.view(batch, n_out, k)


def _apply_mix(decision: MixDecision, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    mix = decision.mix.to(x.dtype)
    size = state.sizes(x)
    num = mix @ (x * size)
    den = mix @ size
    source = None if state.source is None else mix @ state.source
    return num / den, replace(state, size=den, source=source, presence=decision.presence)


def protected_mix(weights: torch.Tensor, protected: int) -> torch.Tensor:
    """[B, m, n] dense merge weights over the unprotected tokens -> the [B, protected + m,
    protected + n] `MixDecision.mix` that keeps the protected tokens in place (concatenation, no
    scatter)."""
    b, m, n = weights.shape
    if protected == 0:
        return weights
    eye = torch.eye(protected, dtype=weights.dtype, device=weights.device).expand(b, protected, protected)
    top = torch.cat([eye, weights.new_zeros(b, protected, n)], dim=2)
    bottom = torch.cat([weights.new_zeros(b, m, protected), weights], dim=2)
    return torch.cat([top, bottom], dim=1)


def mlerp_rescale(avg: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """ToFu's MLERP: keep the direction of `avg` [B, M, C], give it the norm `target_norm` [B, M, 1].

    Divides by the norm of the *average itself* (not by a member's norm), so the result's norm is
    exactly `target_norm`: a merged token no longer shrinks the way a plain average of dissimilar
    vectors does.
    """
    return avg * (target_norm / avg.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(avg.dtype).tiny))


def identity_slots(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """dst for tokens that stay where they are: [B, n] = 0..n-1."""
    return torch.arange(n, device=device).expand(batch, n)
