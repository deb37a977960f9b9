"""The small interface every token-reduction method implements.

A method sees what a block offers (`Signals`) and returns a `Decision` (see `merge.py`). It also
states, without any tensor, how many tokens it can remove from a layer, at which layers it acts and
what its own decision costs in multiply-accumulates, so schedules are validated and FLOPs counted
analytically. Method-specific options (EViT's layers, ToFu's transition layer...) are keyword
arguments of the method's constructor, each declared once in `options_spec` as an `Option` (default,
type, range), which the base class checks; recipes carry them in `options`.

Learned methods (DTEM, PatchMerger, LTM) set `learned` and build their parameters in
`make_modules` from plain shapes (`LayerSpec`); the adapter registers them on the model, hands each
block's module to `decide` in `Signals.module`, and `tomectl.train` fits them. While a module is in
training mode a method may return a relaxed (differentiable) decision; in eval mode it must return
the same hard, static-shape decision that is exported. A module may leave a scalar `aux_loss` (its
own training objective, already weighted) after a training-mode forward; the trainer adds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from .merge import Decision, TokenState


@dataclass(frozen=True)
class Signals:
    """What a block hands a method, right after its attention residual.

    x:        [B, N, C] tokens.
    keys:     [B, H, N, d] the attention keys of this block (after q/k norm).
    state:    sizes, sources and the protected-token count.
    layer:    index of this block (0-based), or -1 where unknown.
    n_layers: number of blocks of the model, or 0 where unknown.
    cls_attn: [B, N] the class token's attention row of this block (softmax over all N keys,
              proportional-attention bias included, averaged over heads), or None. Provided only
              to methods whose `needs_cls_attn` is set, and only at layers where they remove tokens.
    x_norm:   [B, N, C] the block's normalised input (what its attention saw), or None.
    module:   this block's learned module (learned methods), or None.
    """

    x: torch.Tensor
    keys: torch.Tensor
    state: TokenState
    layer: int = -1
    n_layers: int = 0
    cls_attn: Optional[torch.Tensor] = None
    x_norm: Optional[torch.Tensor] = None
    module: Optional[nn.Module] = None


@dataclass(frozen=True)
class Option:
    """One method option: its default, type and range, declared once and checked in one place.

    kind: "int" (a whole number), "float" (any finite number), "choice" (one of `choices`) or
    "layers" (a list of distinct block indices >= 0). low / high bound numbers (`low_open`: low
    itself excluded); `nullable`: None is allowed (it means the method's own default)."""

    default: Any
    kind: str = "float"
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    choices: tuple = ()
    nullable: bool = False

    def describe(self) -> str:
        if self.kind == "layers":
            what = "a list of block indices >= 0"
        elif self.kind == "choice":
            what = "one of " + ", ".join(map(str, self.choices))
        else:
            what = "a whole number" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                what += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                what += f" {'>' if self.low_open else '>='} {self.low:g}"
        return what + (" or null" if self.nullable else "")

    def check(self, method: str, name: str, value: Any) -> Any:
        """`value` validated (one-line UserError naming the method, the option and the range)."""
        if value is None and self.nullable:
            return None
        if self.kind == "layers":
            return check_layers(value, method, name)
        bad = UserError(f"method {method!r}: option {name} must be {self.describe()}, got {value!r}")
        if self.kind == "choice":
            if value not in self.choices:
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            raise bad
        if not math.isfinite(value) or (self.low is not None and (value <= self.low if self.low_open
                                                                   else value < self.low)) \
                or (self.high is not None and value > self.high):
            raise bad
        return value if self.kind == "int" else float(value)


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one block under a plan: what a learned method builds its parameters from, and what
    `ReductionMethod.overhead_macs` prices.

    key_weight / key_bias: the block's key projection ([H*d, C], [H*d]) as plain tensors, for methods
    that start from the keys' similarity (DTEM); None where the model has no separate key projection.
    """

    layer: int
    n_tokens: int  # tokens entering the block
    amount: int  # tokens the plan removes at this block
    protected: int
    embed_dim: int
    num_heads: int
    head_dim: int
    key_weight: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None


class ReductionMethod:
    """Base class: subclasses set `name` and implement `capacity` and `decide` (and usually
    `overhead_macs`)."""

    name: str = ""
    #: whether the method merges (uses sizes, proportional attention makes sense) or only prunes
    merges: bool = True
    #: whether `decide` needs `Signals.cls_attn` (the model must then have a class token)
    needs_cls_attn: bool = False
    #: method options, each declared once (default, type, range); the constructor takes exactly
    #: these as keywords and checks them
    options_spec: dict[str, Option] = {}
    #: their defaults (derived from `options_spec`)
    option_defaults: dict[str, Any] = {}
    #: whether the method has parameters that are trained (`make_modules`, `tomectl train`)
    learned: bool = False
    #: whether an untrained module is still a sensible model (DTEM starts as ToMe); if not, building
    #: the method without trained parameters is refused outside of training
    usable_untrained: bool = True
    #: whether its training-mode (relaxed) decisions rely on proportional attention, so training
    #: with prop_attn off is refused (DTEM: a merged-away token vanishes only through its log-size)
    trains_with_prop_attn: bool = False
    #: whether decisions are dense mixing matrices (`MixDecision`), whose matmul `overhead_macs`
    #: counts itself in every formulation
    dense: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.option_defaults = {k: o.default for k, o in cls.options_spec.items()}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options_spec))
        if unknown:
            allowed = ", ".join(self.options_spec) or "none"
            raise UserError(f"method {self.name!r} has no option {unknown[0]!r}; its options: {allowed}")
        self.options = {k: spec.check(self.name, k, options.get(k, spec.default))
                        for k, spec in self.options_spec.items()}

    def layers(self, n_layers: int) -> Optional[tuple[int, ...]]:
        """Blocks (0-based) where this method can remove tokens; None: every block."""
        return None

    def capacity(self, n_tokens: int, protected: int) -> int:
        """Most tokens this method can remove at one layer that receives `n_tokens`."""
        raise NotImplementedError

    def cost_regime(self, layer: int, n_layers: int) -> str:
        """Which kind of decision this method computes at `layer` (a name): blocks of one regime cost
        the same at the same (tokens, removed). The latency model times each regime apart."""
        return "all"

    def overhead_macs(self, spec: LayerSpec) -> int:
        """Multiply-accumulates of the decision itself (matching, the class-attention row), per image,
        at a block of shapes `spec` removing `spec.amount` tokens."""
        return 0

    def make_modules(self, specs: Sequence[LayerSpec]) -> dict[int, nn.Module]:
        """Learned methods: a fresh module for each block that needs one (key: the block index)."""
        return {}

    def decide(self, amount: int, signals: Signals) -> Optional[Decision]:
        """Where each token goes when `amount` tokens are removed at this layer (None: keep all)."""
        raise NotImplementedError


def check_layers(value: Any, name: str, option: str = "layers") -> Optional[tuple[int, ...]]:
    """Validate a `layers` option: None or a list of distinct block indices >= 0."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise UserError(f"method {name!r}: option {option} must be a list of block indices >= 0, "
                        f"got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"method {name!r}: option {option} lists a block twice: {list(value)}")
    return tuple(sorted(value))


def within(layers: Sequence[int], n_layers: int, name: str) -> tuple[int, ...]:
    """`layers` checked against a model's depth (a one-line error naming the first bad index)."""
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise UserError(
            f"method {name!r} is set to act at block {bad[0]} but the model has {n_layers} blocks "
            f"(0-{n_layers - 1})"
        )
    return tuple(layers)
