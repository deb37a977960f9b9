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
- Methods that rank tokens by the class token's attention (EViT, BAT) get that one row without
  giving up the fused kernel: the queries are read the same way (hook on ``attn.q_norm``), and
  ``softmax(q_cls . K^T * scale + bias)`` is computed apart, averaged over heads, only at the
  blocks where such a method removes tokens.
- Per-forward state (sizes, sources, protected count) is a `TokenState` value passed from block
  to block; the static configuration (`ReductionPlan`) lives on the model.
- Learned methods' parameters (DTEM's embeddings, PatchMerger's queries, LTM's mask modules) live
  in ``model.tomectl_modules``, a ModuleDict keyed by block index, so they move, train and save
  with the model; `remove` takes them off again (the plain model's state_dict is unchanged).
- Average pooling is made size-weighted by scaling each patch token by ``s_i * n / sum(s)``
  before timm's own head, which then computes ``sum(s_i x_i) / sum(s_i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from ..reduce import FORMULATIONS, LayerSpec, Signals, TokenState, apply_decision, get_method

try:  # timm is a dependency of the package, but the core must not need it
    from timm.models.vision_transformer import Block, VisionTransformer
except ImportError:  # pragma: no cover
    Block = VisionTransformer = None  # type: ignore

POOLS = ("token", "avg", "")
LEARNED_ATTR = "tomectl_modules"  # where a learned method's modules live on the model (and in its graphs)


@dataclass(frozen=True)
class ReductionPlan:
    """What to remove where: the static configuration of a reduced model."""

    method: str
    removed: tuple[int, ...]  # tokens removed at each block
    prop_attn: bool = True  # proportional attention (ToMe Eq. 1)
    formulation: str = "scatter"  # how merges are computed, see reduce/merge.py
    track_source: bool = False  # keep which patches each token holds (visualisation)
    options: dict = field(default_factory=dict)  # the method's own options (see reduce/base.py)

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.removed)


class _KeyTap:
    """Forward hook on `attn.k_norm` (or `attn.q_norm`): keeps the keys (queries) of the last call
    for the block to read."""

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
        if not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "num_heads", "head_dim")):
            raise UserError(
                f"block {i} uses attention {type(attn).__name__}, which has no q/k/v projection "
                "tomectl can read keys from"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise UserError("attention-pooling ('map') heads are not supported yet; "
                        "use a token or avg pool model")
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
    its state_dict keys and isinstance checks).

    timm's three entry points agree: ``forward(x) == forward_head(forward_features(x))``. For an
    average-pool model whose tokens were merged, `forward_features` returns the final tokens
    already scaled by ``s_i * n / sum(s)``, so that timm's own mean in `forward_head` is the
    size-weighted one (token-pool models get their tokens unchanged). `forward_intermediates`
    (per-block features) is refused with one line while the reduction is on: the blocks' token
    counts differ, and timm's callers expect the full grid.

    While the reduction is switched off (`set_enabled(model, False)`), every entry point is timm's
    own, so the model computes exactly what the plain timm model computes.
    """

    def forward_features(self, x, attn_mask=None, is_causal=False):
        if not self._tomectl_enabled:
            return _plain(self).forward_features(self, x, **_mask_kwargs(attn_mask, is_causal))
        _refuse_masks(attn_mask, is_causal)
        x, state = self.forward_tokens(x)
        return _weight_for_pool(self, x, state)

    def forward(self, x, attn_mask=None, is_causal=False):
        if not self._tomectl_enabled:
            return _plain(self).forward(self, x, **_mask_kwargs(attn_mask, is_causal))
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))

    def forward_intermediates(self, *args, **kwargs):
        if not self._tomectl_enabled or not self.tomectl_plan.active:
            return _plain(self).forward_intermediates(self, *args, **kwargs)
        raise UserError(
            "forward_intermediates is not available on a token-reduced model (its blocks see fewer "
            "tokens than the patch grid); switch the reduction off or remove it first"
        )

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        """Image [B, 3, H, W] -> final normalised tokens [B, N_L, C] and their TokenState."""
        plan: ReductionPlan = self.tomectl_plan
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = TokenState.start(x, self.num_prefix_tokens, plan.track_source)
        n_layers = len(self.blocks)
        modules = getattr(self, "tomectl_modules", None)
        layers = zip(self.blocks, self._tomectl_taps, plan.removed, strict=True)
        for i, (blk, taps, amount) in enumerate(layers):
            module = modules[str(i)] if modules is not None and str(i) in modules else None
            x, state = _block_forward(blk, taps, x, state, amount, self._tomectl_method, plan, i, n_layers,
                                      module)
        return self.norm(x), state


def _plain(model) -> type:
    """The model's own timm class (the one after the mixin)."""
    return type(model).__mro__[2]


def _mask_kwargs(attn_mask, is_causal) -> dict:
    """timm's forward takes attn_mask/is_causal only in newer releases: pass them only when given."""
    out = {}
    if attn_mask is not None:
        out["attn_mask"] = attn_mask
    if is_causal:
        out["is_causal"] = is_causal
    return out


def _refuse_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("a token-reduced model does not take attention masks")


def _block_forward(blk, taps: tuple[_KeyTap, _KeyTap], x, state: TokenState, amount: int, method,
                   plan: ReductionPlan, layer: int = -1, n_layers: int = 0,
                   module: Optional[nn.Module] = None):
    """timm's Block, with the reduction between the attention and the MLP residuals."""
    bias = state.attn_bias() if plan.prop_attn else None
    h = blk.norm1(x)
    x = x + blk.drop_path1(blk.ls1(blk.attn(h, attn_mask=bias)))
    key_tap, query_tap = taps
    keys, queries = key_tap.take(), query_tap.take()
    if amount > 0:
        cls_attn = class_attention(blk.attn, queries, keys, bias) if method.needs_cls_attn else None
        signals = Signals(x=x, keys=keys, state=state, layer=layer, n_layers=n_layers, cls_attn=cls_attn,
                          x_norm=h, module=module)
        decision = method.decide(amount, signals)
        if decision is not None:
            x, state = apply_decision(decision, x, state, plan.formulation)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, state


def run_block(model, index: int, x: torch.Tensor, state: TokenState, amount: int, method=None,
              layer: Optional[int] = None) -> torch.Tensor:
    """Block `index` of an installed model on tokens `x` alone, removing `amount` with `method` (the
    installed one by default) as if it were block `layer`: what the latency model times."""
    plan: ReductionPlan = model.tomectl_plan
    y, _ = _block_forward(model.blocks[index], model._tomectl_taps[index], x, state, amount,
                          method or model._tomectl_method, plan, index if layer is None else layer,
                          len(model.blocks))
    return y


def class_attention(attn, queries: torch.Tensor, keys: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The class token's (position 0) attention row, averaged over heads: [B, N].

    queries, keys: [B, H, N, d] as the block's attention used them; bias: the additive attention
    mask it was given ([B, 1, 1, N] log-sizes) or None. Costs H * N * d MACs, beside the fused kernel.
    """
    scale = getattr(attn, "scale", queries.shape[-1] ** -0.5)
    logits = (queries[:, :, :1] * scale) @ keys.transpose(-2, -1)  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


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


def layer_specs(model, removed) -> list[LayerSpec]:
    """Per-block shapes under `removed` (and each block's key projection), for learned methods."""
    specs, n = [], num_tokens(model)
    for i, (blk, r) in enumerate(zip(model.blocks, removed, strict=True)):
        attn = blk.attn
        hd = attn.num_heads * attn.head_dim
        kw = kb = None
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, nn.Linear) and qkv.out_features == 3 * hd:
            kw = qkv.weight.detach()[hd:2 * hd]
            kb = None if qkv.bias is None else qkv.bias.detach()[hd:2 * hd]
            k_bias = getattr(attn, "k_bias", None)  # models with separate q/v biases and no k bias
            if kb is None and isinstance(k_bias, torch.Tensor):
                kb = k_bias.detach()
        specs.append(LayerSpec(layer=i, n_tokens=n, amount=r, protected=protected_tokens(model),
                               embed_dim=model.embed_dim, num_heads=attn.num_heads, head_dim=attn.head_dim,
                               key_weight=kw, key_bias=kb))
        n -= r
    return specs


def _shapes(modules: nn.ModuleDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in modules.state_dict().items()}


def install(model: nn.Module, plan: ReductionPlan, modules: Optional[nn.ModuleDict] = None) -> nn.Module:
    """Install `plan` into `model` in place (again if already installed) and return the model.

    Learned methods: `modules` (e.g. kept from before a `remove`) are used if given; else the ones
    already installed are kept if they are the same blocks; else fresh ones are built.
    """
    check_supported(model)
    if len(plan.removed) != len(model.blocks):
        raise UserError(f"schedule has {len(plan.removed)} layers "
                        f"but the model has {len(model.blocks)} blocks")
    if plan.formulation not in FORMULATIONS:
        raise UserError(f"unknown merge formulation {plan.formulation!r}; "
                        f"choose one of {', '.join(FORMULATIONS)}")
    method = get_method(plan.method, plan.options)
    layers = method.layers(len(model.blocks))
    if layers is not None:
        acting = set(layers)
        stray = [i for i, r in enumerate(plan.removed) if r > 0 and i not in acting]
        if stray:
            raise UserError(
                f"method {plan.method!r} removes tokens only at blocks {list(layers)}, "
                f"but the plan removes some at block {stray[0]}"
            )
    if method.needs_cls_attn and plan.active and getattr(model, "cls_token", None) is None:
        raise UserError(
            f"method {plan.method!r} ranks tokens by the class token's attention, and this model has no "
            "class token; use tome or tofu"
        )
    if not hasattr(model, "_tomectl_taps"):
        taps, handles_ = [], []
        for blk in model.blocks:
            key_tap, query_tap = _KeyTap(), _KeyTap()
            handles_.append(blk.attn.k_norm.register_forward_hook(key_tap))
            handles_.append(blk.attn.q_norm.register_forward_hook(query_tap))
            taps.append((key_tap, query_tap))
        model._tomectl_taps = taps
        model._tomectl_hooks = handles_
    if method.learned:
        if modules is None:
            current = getattr(model, "tomectl_modules", None)
            built = method.make_modules(layer_specs(model, plan.removed))
            fresh = nn.ModuleDict({str(k): m for k, m in built.items()})
            if current is not None and getattr(current, "tomectl_method", None) == plan.method \
                    and _shapes(current) == _shapes(fresh):
                modules = current  # the same method's modules, of the same shapes: keep what they learned
            else:
                ref = next(model.parameters())
                modules = fresh.to(ref.device, ref.dtype)
                modules.train(model.training)  # fresh modules follow the model's mode
        modules.tomectl_method = plan.method
        model.tomectl_modules = modules
    elif hasattr(model, "tomectl_modules"):
        del model.tomectl_modules
    model._tomectl_method = method
    model.tomectl_plan = plan
    if not hasattr(model, "_tomectl_enabled"):
        model._tomectl_enabled = True
    model.__class__ = _reduced_class(type(model))
    return model


def plan_of(model: nn.Module) -> Optional[ReductionPlan]:
    """The plan installed in `model`, or None for a plain model."""
    return model.tomectl_plan if isinstance(model, ReducedViT) else None


def learned_modules(model: nn.Module) -> Optional[nn.ModuleDict]:
    """The learned method's parameters installed in `model` (a ModuleDict by block), or None."""
    return getattr(model, "tomectl_modules", None) if isinstance(model, ReducedViT) else None


def set_enabled(model: nn.Module, on: bool) -> bool:
    """Switch an installed reduction on or off without reinstalling it (hooks, plan and learned
    modules stay); returns the previous state. Off, the model runs timm's own forward."""
    if not isinstance(model, ReducedViT):
        raise ValueError("no reduction is installed in this model")
    before = model._tomectl_enabled
    model._tomectl_enabled = bool(on)
    return before


def is_enabled(model: nn.Module) -> bool:
    return isinstance(model, ReducedViT) and model._tomectl_enabled


def remove(model: nn.Module) -> nn.Module:
    """Undo `install`: the model is its plain timm self again."""
    if isinstance(model, ReducedViT):
        for h in model._tomectl_hooks:
            h.remove()
        for attr in ("_tomectl_taps", "_tomectl_hooks", "_tomectl_method", "tomectl_plan",
                     "_tomectl_enabled"):
            delattr(model, attr)
        if hasattr(model, "tomectl_modules"):
            del model.tomectl_modules
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
