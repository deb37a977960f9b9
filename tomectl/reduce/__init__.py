"""Token-reduction algorithms on tensors: no timm, no CLI. One method a file.

`get_method(name)` returns the method object the model adapter calls; `METHODS` lists them.
"""

from __future__ import annotations

from ..errors import UserError
from .base import ReductionMethod, Signals
from .merge import FORMULATIONS, Decision, TokenState, apply_decision
from .tome import ToMe, bipartite_soft_matching

METHODS: dict[str, type[ReductionMethod]] = {
    ToMe.name: ToMe,
}


def get_method(name: str) -> ReductionMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise UserError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = [
    "FORMULATIONS",
    "METHODS",
    "Decision",
    "ReductionMethod",
    "Signals",
    "TokenState",
    "ToMe",
    "apply_decision",
    "bipartite_soft_matching",
    "get_method",
]
