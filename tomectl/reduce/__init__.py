"""Token-reduction algorithms on tensors: no timm, no CLI. One method a file.

`get_method(name, options)` returns the method object the model adapter calls; `METHODS` lists them.
"""

from __future__ import annotations

from typing import Optional

from ..errors import UserError
from .base import LayerSpec, ReductionMethod, Signals
from .bat import BAT, beyond_attentive_tokens, density_peak_clusters
from .dtem import DTEM, relaxed_matching
from .evit import EViT, attentive_fusion
from .ltm import LTM
from .merge import (
    FORMULATIONS,
    BipartiteDecision,
    Decision,
    MixDecision,
    SlotDecision,
    TokenState,
    apply_decision,
    mlerp_rescale,
)
from .patchmerger import PatchMerger
from .tofu import ToFu, token_fusion
from .tome import ToMe, bipartite_soft_matching

METHODS: dict[str, type[ReductionMethod]] = {
    m.name: m for m in (ToMe, ToFu, EViT, BAT, DTEM, PatchMerger, LTM)
}


def get_method(name: str, options: Optional[dict] = None) -> ReductionMethod:
    """The method `name`, configured with its own `options` (see each method's `option_defaults`)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UserError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
    return cls(**(options or {}))


__all__ = [
    "BAT",
    "BipartiteDecision",
    "MixDecision",
    "SlotDecision",
    "FORMULATIONS",
    "METHODS",
    "DTEM",
    "Decision",
    "EViT",
    "LTM",
    "LayerSpec",
    "PatchMerger",
    "ReductionMethod",
    "Signals",
    "ToFu",
    "TokenState",
    "ToMe",
    "apply_decision",
    "attentive_fusion",
    "beyond_attentive_tokens",
    "bipartite_soft_matching",
    "density_peak_clusters",
    "get_method",
    "mlerp_rescale",
    "relaxed_matching",
    "token_fusion",
]
