"""Adapter for timm's `VisionTransformer` (vision_transformer.py and its subclass in deit.py).

It calls timm's own parts (`patch_embed`, `_pos_embed`, `norm_pre`, each block's `norm1`, `attn`,
`ls1`, `drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2`, the model's `norm` and `forward_head`)
and only changes the order inside a block: attention, *reduce*, MLP. Nothing of timm's code is
copied, so LayerScale, q/k norm, scale norm, gating and whatever timm adds inside those parts
keep working.

- Proportional attention goes in as timm's own ``attn_mask`` argument (an additive log-size
  bias), so timm's fused ``F.scaled_dot_product_attention`` path stays in use.
- The attention keys (the ToMe similarity) are read by a forward hook on ``attn.k_norm``, the
  point where timm's Attention has its final keys (k_norm is an Identity without q/k norm).
- Per-forward state (sizes, sources, protected count) is a `TokenState` value passed from block
  to block; the static configuration (`ReductionPlan`) lives on the model.
- Average pooling is made size-weighted by scaling each patch token by ``s_i * n / sum(s)``
  before timm's own head, which then computes ``sum(s_i x_i) / sum(s_i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from ..reduce import FORMULATIONS, Signals, TokenState, apply_decision, get_method

try:  # timm is a dependency of the package, but the core must not need it
    from timm.models.vision_transformer import Block, VisionTransformer
except ImportError:  # pragma: no cover
    Block = VisionTransformer = None  # type: ignore

POOLS = ("token", "avg", "")


@dataclass(frozen=True)
class ReductionPlan:
    """What to remove where: the static configuration of a reduced model."""

    method: str
    removed: tuple[int, ...]  # tokens removed at each block
    prop_attn: bool = True  # proportional attention (ToMe Eq. 1)
    formulation: str = "scatter"  # how merges are computed, see reduce/merge.py
    track_source: bool = False  # keep which patches each token holds (visualisation)
    options: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.removed)


class _KeyTap:
    """Forward hook on `attn.k_norm`: keeps the keys of the last call for the block to read."""

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None

    def __call__(self, module, inputs, output):
        self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


def handles(model) -> bool:
    return VisionTransformer is not None and isinstance(model, VisionTransformer)


def check_supported(model) -> None:
    """Raise a one-line UserError for any part of `model` this adapter cannot reduce."""
    if not handles(model):
        raise UserError(f"{type(model).__name__} is not a timm VisionTransformer")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block):
            raise UserError(
                f"block {i} is a timm {type(blk).__name__}; tomectl reduces only the standard "
                "pre-norm Block (attention then MLP)"
            )
        attn = blk.attn
        if not all(hasattr(attn, a) for a in ("qkv", "k_norm", "num_heads", "head_dim")):
            raise UserError(
                f"block {i} uses attention {type(attn).__name__}, which has no q/k/v projection "
                "tomectl can read keys from"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise UserError("attention-pooling ('map') heads are not supported yet; use a token or avg pool model")
    if model.global_pool not in POOLS:
        raise UserError(
            f"global_pool={model.global_pool!r} is not supported; supported: token, avg"
        )


def num_layers(model) -> int:
    return len(model.blocks)


def num_tokens(model) -> int:
    """Tokens entering the first block at the model's default image size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def protected_tokens(model) -> int:
    return model.num_prefix_tokens


class ReducedViT:
    """Mixin placed in front of the model's own class by `install` (the model keeps its weights,
    its state_dict keys and isinstance checks)."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        _refuse_masks(attn_mask, is_causal)
        return self.forward_tokens(x)[0]

    def forward(self, x, attn_mask=None, is_causal=False):
        _refuse_masks(attn_mask, is_causal)
        x, state = self.forward_tokens(x)
        return self.forward_head(_weight_for_pool(self, x, state))

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        """Image [B, 3, H, W] -> final normalised tokens [B, N_L, C] and their TokenState."""
        plan: ReductionPlan = self.tomectl_plan
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = TokenState.start(x, self.num_prefix_tokens, plan.track_source)
        for blk, tap, amount in zip(self.blocks, self._tomectl_taps, plan.removed):
            x, state = _block_forward(blk, tap, x, state, amount, self._tomectl_method, plan)
        return self.norm(x), state


def _refuse_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("a token-reduced model does not take attention masks")


def _block_forward(blk, tap: _KeyTap, x, state: TokenState, amount: int, method, plan: ReductionPlan):
    """timm's Block, with the reduction between the attention and the MLP residuals."""
    bias = state.attn_bias() if plan.prop_attn else None
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), attn_mask=bias)))
    keys = tap.take()
    if amount > 0:
        decision = method.decide(amount, Signals(x=x, keys=keys, state=state))
        if decision is not None:
            x, state = apply_decision(decision, x, state, plan.formulation)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, state


def _weight_for_pool(model, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Make timm's plain average pool a size-weighted one (exact; no-op before any merge)."""
    if model.global_pool != "avg" or state.size is None:
        return x
    if model.pool_include_prefix:
        s = state.size
        return x * (s * s.shape[1] / s.sum(dim=1, keepdim=True))
    p = model.num_prefix_tokens
    s = state.size[:, p:]
    return torch.cat([x[:, :p], x[:, p:] * (s * s.shape[1] / s.sum(dim=1, keepdim=True))], dim=1)


_CLASSES: dict[type, type] = {}


def _reduced_class(cls: type) -> type:
    if issubclass(cls, ReducedViT):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Reduced{cls.__name__}", (ReducedViT, cls), {"__module__": __name__})
    return _CLASSES[cls]


def install(model: nn.Module, plan: ReductionPlan) -> nn.Module:
    """Install `plan` into `model` in place (again if already installed) and return the model."""
    check_supported(model)
    if len(plan.removed) != len(model.blocks):
        raise UserError(f"schedule has {len(plan.removed)} layers but the model has {len(model.blocks)} blocks")
    if plan.formulation not in FORMULATIONS:
        raise UserError(f"unknown merge formulation {plan.formulation!r}; choose one of {', '.join(FORMULATIONS)}")
    method = get_method(plan.method)
    if not hasattr(model, "_tomectl_taps"):
        taps, handles_ = [], []
        for blk in model.blocks:
            tap = _KeyTap()
            handles_.append(blk.attn.k_norm.register_forward_hook(tap))
            taps.append(tap)
        model._tomectl_taps = taps
        model._tomectl_hooks = handles_
    model._tomectl_method = method
    model.tomectl_plan = plan
    model.__class__ = _reduced_class(type(model))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `install`: the model is its plain timm self again."""
    if isinstance(model, ReducedViT):
        for h in model._tomectl_hooks:
            h.remove()
        for attr in ("_tomectl_taps", "_tomectl_hooks", "_tomectl_method", "tomectl_plan"):
            delattr(model, attr)
        model.__class__ = type(model).__mro__[2]
    return model


@dataclass(frozen=True)
class Dims:
    """What the analytic FLOPs count needs to know of a ViT (all per image)."""

    n_tokens: int
    protected: int
    embed_dim: int
    embed_macs: int
    head_macs: int
    attn_linear_macs: tuple[int, ...]  # per token, per block (qkv, proj, gate...)
    mlp_linear_macs: tuple[int, ...]  # per token, per block
    attn_dims: tuple[int, ...]  # heads x head_dim, per block
    head_dims: tuple[int, ...]  # head_dim, per block


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def dims(model) -> Dims:
    pe = model.patch_embed
    w = pe.proj.weight  # [C, in_chans, kh, kw]
    grid = pe.num_patches
    head_macs = 0
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            head_macs += _linear_macs(head)
    return Dims(
        n_tokens=num_tokens(model),
        protected=protected_tokens(model),
        embed_dim=model.embed_dim,
        embed_macs=grid * w.numel(),
        head_macs=head_macs,
        attn_linear_macs=tuple(_linear_macs(b.attn) for b in model.blocks),
        mlp_linear_macs=tuple(_linear_macs(b.mlp) for b in model.blocks),
        attn_dims=tuple(b.attn.num_heads * b.attn.head_dim for b in model.blocks),
        head_dims=tuple(b.attn.head_dim for b in model.blocks),
    )
