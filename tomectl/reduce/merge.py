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
  the batch folded into one flat row index (ONNX ScatterND with reduction=add). Fastest on CPU, in
  PyTorch and onnxruntime alike (see `_add_rows`).
- ``"onehot"``: an assignment matrix ``A[b, i, j] = (dst[b, i] == j)`` built from an Equal
  against a constant range, then ``A^T (w s x)``: MatMul only, no Scatter at all (TensorRT parses
  it without plugins).

A *dense* decision gives a mixing matrix instead of slots (learned methods: PatchMerger's
queries, LTM's masks, DTEM's relaxed merge while training): ``mix[b, j, i] >= 0`` is how much of
input token i goes to output j, and ``x_j = sum_i mix_ji s_i x_i / sum_i mix_ji s_i`` with size
``sum_i mix_ji s_i``; a hard assignment is the special case of a 0/1 matrix. MatMul only.

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


@dataclass(frozen=True)
class Decision:
    """Where each input token goes.

    dst:    [B, N] int64, the output slot (0..n_out-1) of each input token. Every slot receives
            at least one token with a non-zero weight. None for a dense decision.
    n_out:  number of output tokens (a Python int, so shapes stay static).
    weight: [B, N] optional extra averaging weight per input token (multiplies its size). A
            weight of exactly 0 *drops* the token: it neither moves the average nor adds its
            size to the destination (pruning).
    norm:   None for the plain (weighted) average; "max" rescales each merged token to the largest
            norm among its (non-dropped) members (ToFu's MLERP).
    mix:    [B, n_out, N] dense merge weights (see the module docstring) instead of `dst`; every
            output row must hold some weight. Neither `weight` nor `norm` goes with it.
    presence: [B, n_out, 1] for relaxed (training-time) merges that keep every token: how much of
            each output token is still its own (1: untouched, near 0: merged away). Carried in the
            TokenState for the next relaxed decision; None for hard decisions.
    """

    dst: Optional[torch.Tensor]
    n_out: int
    weight: Optional[torch.Tensor] = None
    norm: Optional[str] = None
    mix: Optional[torch.Tensor] = None
    presence: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TokenState:
    """Per-forward bookkeeping that travels with the tokens through the blocks.

    protected: the first `protected` tokens (class, distillation, register tokens) are never
               merged or pruned and keep their positions.
    size:      [B, N, 1] float, or None while every token is still a single patch.
    source:    [B, N, N0] float 0/1 membership of the original tokens, or None (not tracked).
    presence:  [B, N, 1] relaxed merging only (see `Decision.presence`), else None.
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
        return self.size.log().transpose(1, 2).unsqueeze(1)


def apply_decision(
    decision: Decision,
    x: torch.Tensor,
    state: TokenState,
    formulation: str = "scatter",
) -> tuple[torch.Tensor, TokenState]:
    """Carry out `decision` on tokens `x` [B, N, C]; returns the new tokens [B, n_out, C] and state."""
    if decision.mix is not None:
        return _apply_mix(decision, x, state)
    size = state.sizes(x)
    keep = None if decision.weight is None else (decision.weight != 0).to(x.dtype)[..., None]
    w = size if decision.weight is None else size * decision.weight[..., None]
    kept_size = size if keep is None else size * keep
    unit = state.size is None and decision.weight is None  # every weight is 1: x * w == x exactly

    if decision.norm is not None and decision.norm not in NORMS:
        raise ValueError(f"unknown merge norm {decision.norm!r}; choose one of {NORMS}")
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
    elif formulation == "onehot":
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
    else:
        raise ValueError(f"unknown merge formulation {formulation!r}; choose one of {FORMULATIONS}")

    out = num / den
    if decision.norm == "mean":
        out, target = out[..., :-1], out[..., -1:]
    if member_norm is not None:
        out = mlerp_rescale(out, target)
    return out, replace(state, size=new_size, source=source, presence=decision.presence)


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


def _apply_mix(decision: Decision, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    if decision.weight is not None or decision.norm is not None:
        raise ValueError("a dense (mix) decision takes neither weight nor norm")
    mix = decision.mix.to(x.dtype)
    size = state.sizes(x)
    num = mix @ (x * size)
    den = mix @ size
    source = None if state.source is None else mix @ state.source
    return num / den, replace(state, size=den, source=source, presence=decision.presence)


def protected_mix(weights: torch.Tensor, protected: int) -> torch.Tensor:
    """[B, m, n] dense merge weights over the unprotected tokens -> the [B, protected + m,
    protected + n] `Decision.mix` that keeps the protected tokens in place (concatenation, no
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
