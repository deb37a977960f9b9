"""Reduction schedules: how many tokens each layer removes.

A schedule is written as one of four shapes (the same keys in recipes, the CLI and the API):

- ``{r: 13}``                   constant: every layer removes r tokens;
- ``{r: 13, inflect: -1.0}``    ToMe's linear ramp, as its reference code computes it (`(r, inflect)`):
                                from int(r*(1 - inflect)) at the first layer to 2r minus that at the
                                last, each layer's count truncated (int), so the total is at most
                                constant r's (ToMe's "decreasing schedule" is inflect = -1: 2r -> 0;
                                r=13: 26 23 21 18 16 14 11 9 7 4 2 0);
- ``{per_layer: [..]}``         explicit per-layer counts;
- ``{keep: 0.5}``               the fraction of unprotected tokens left after the last layer,
                                removed as evenly as possible (earlier layers take the remainder).

`resolve()` turns a shape into per-layer counts for a model. `r` shapes are capped at what the
method can remove at each layer (as ToMe caps r at half the unprotected tokens); `per_layer` and
`keep` are exact requests, so the first layer that cannot remove what they ask is named in an error.

Methods that act only at some layers (EViT and BAT: 3, 6, 9 of 12) pass those as `layers`: `r`
is then removed at each of those layers (a ramp runs over them), `keep` is spread over them, and
a `per_layer` list may remove tokens only there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import UserError

SCHEDULE_KEYS = ("r", "inflect", "per_layer", "keep")


@dataclass(frozen=True)
class Schedule:
    r: Optional[int] = None
    inflect: Optional[float] = None
    per_layer: Optional[tuple[int, ...]] = None
    keep: Optional[float] = None

    @staticmethod
    def from_dict(d: Any, where: str = "schedule") -> "Schedule":
        if not isinstance(d, dict):
            raise UserError(f"{where} must be a mapping like {{r: 13}}, got {d!r}")
        unknown = sorted(set(d) - set(SCHEDULE_KEYS))
        if unknown:
            raise UserError(
                f"{where} has unknown key {unknown[0]!r}; allowed keys: {', '.join(SCHEDULE_KEYS)}"
            )
        return Schedule.make(
            r=d.get("r"), inflect=d.get("inflect"), per_layer=d.get("per_layer"), keep=d.get("keep"),
            where=where,
        )

    @staticmethod
    def make(r=None, inflect=None, per_layer=None, keep=None, where: str = "schedule") -> "Schedule":
        given = [k for k, v in (("r", r), ("per_layer", per_layer), ("keep", keep)) if v is not None]
        if len(given) != 1:
            raise UserError(
                f"{where}: give exactly one of r, per_layer or keep (got {', '.join(given) or 'none'})"
            )
        if inflect is not None and r is None:
            raise UserError(f"{where}: inflect only goes with r (a ramp around r)")
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise UserError(f"{where}: r must be a whole number >= 0, got {r!r}")
        if inflect is not None:
            if isinstance(inflect, bool) or not isinstance(inflect, (int, float)) or not -1 <= inflect <= 1:
                raise UserError(f"{where}: inflect must be a number in [-1, 1], got {inflect!r}")
            inflect = float(inflect)
        if per_layer is not None:
            if not isinstance(per_layer, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in per_layer
            ):
                raise UserError(f"{where}: per_layer must be a list of whole numbers >= 0, got {per_layer!r}")
            per_layer = tuple(per_layer)
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
                raise UserError(f"{where}: keep must be a fraction in (0, 1], got {keep!r}")
            keep = float(keep)
        return Schedule(r=r, inflect=inflect, per_layer=per_layer, keep=keep)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.r is not None:
            out["r"] = self.r
        if self.inflect is not None:
            out["inflect"] = self.inflect
        if self.per_layer is not None:
            out["per_layer"] = list(self.per_layer)
        if self.keep is not None:
            out["keep"] = self.keep
        return out

    def describe(self) -> str:
        if self.per_layer is not None:
            return "per-layer " + ",".join(map(str, self.per_layer))
        if self.keep is not None:
            return f"keep {self.keep:g}"
        if self.inflect:
            return f"r={self.r} ramp (inflect {self.inflect:g})"
        return f"r={self.r}"


def layer_counts(schedule: Schedule, n_layers: int, n_tokens: int, protected: int,
                 layers: Optional[Sequence[int]] = None) -> list[int]:
    """Per-layer removals for a model with `n_layers` blocks and `n_tokens` entering the first.

    layers: the only blocks where the method removes tokens (None: all).
    """
    if layers is not None and schedule.per_layer is None:
        acting = layer_counts(schedule, len(layers), n_tokens, protected) if layers else []
        out = [0] * n_layers
        for i, r in zip(layers, acting, strict=True):
            out[i] = r
        return out
    if schedule.per_layer is not None:
        if len(schedule.per_layer) != n_layers:
            raise UserError(
                f"per_layer has {len(schedule.per_layer)} entries but the model has {n_layers} blocks"
            )
        return list(schedule.per_layer)
    if schedule.keep is not None:
        n_free = n_tokens - protected
        total = n_free - round(schedule.keep * n_free)
        base, extra = divmod(total, n_layers)
        return [base + (1 if i < extra else 0) for i in range(n_layers)]
    r, inflect = schedule.r, schedule.inflect or 0.0
    if n_layers == 1 or inflect == 0.0:
        return [r] * n_layers
    first = int(r * (1.0 - inflect))
    step = (2 * r - 2 * first) / (n_layers - 1)
    return [max(0, int(first + step * i)) for i in range(n_layers)]


def token_counts(removed: Sequence[int], n_tokens: int) -> list[int]:
    """Tokens entering each block, then the number left after the last: len(removed) + 1 values."""
    counts = [n_tokens]
    for r in removed:
        counts.append(counts[-1] - r)
    return counts


def _capacity_at(capacity, layers: Optional[Sequence[int]]):
    acting = None if layers is None else set(layers)
    return lambda i, n, p: capacity(n, p) if acting is None or i in acting else 0


def _first_overflow(removed: Sequence[int], n_tokens: int, protected: int, capacity,
                    layers: Optional[Sequence[int]] = None):
    """(layer, asked, most possible, tokens entering) of the first layer that removes more than it
    can, or None."""
    cap_at = _capacity_at(capacity, layers)
    n = n_tokens
    for i, r in enumerate(removed):
        cap = cap_at(i, n, protected)
        if r > cap:
            return i, r, cap, n
        n -= r
    return None


def validate(removed: Sequence[int], n_tokens: int, protected: int, capacity,
             layers: Optional[Sequence[int]] = None, fix: str = "lower r there or earlier") -> None:
    """Raise a UserError naming the first layer that removes more tokens than it can.

    capacity: (n_tokens, protected) -> most tokens removable at a layer (the method's rule).
    layers:   the only blocks where the method removes tokens (None: all).
    fix:      what to change, in the user's terms (the end of the message).
    """
    if layers is not None:
        for i, r in enumerate(removed):
            if r > 0 and i not in layers:
                raise UserError(
                    f"layer {i} would remove {r} tokens but this method removes tokens only at layers "
                    f"{', '.join(map(str, layers))}"
                )
    bad = _first_overflow(removed, n_tokens, protected, capacity, layers)
    if bad is not None:
        i, r, cap, n = bad
        raise UserError(
            f"layer {i} would remove {r} tokens but only {cap} can go there "
            f"({n} tokens enter it, {protected} protected); {fix}"
        )


def _lowest_keep(n_layers: int, n_tokens: int, protected: int, capacity,
                 layers: Optional[Sequence[int]]) -> Optional[float]:
    """The smallest `keep` whose evenly spread removals every layer can take (None: not even 1)."""
    n_free = n_tokens - protected
    for removed_total in range(n_free, -1, -1):
        keep = (n_free - removed_total) / n_free if n_free else 1.0
        if keep <= 0:
            continue
        counts = layer_counts(Schedule(keep=keep), n_layers, n_tokens, protected, layers)
        if _first_overflow(counts, n_tokens, protected, capacity, layers) is None:
            return keep
    return None


def clamp(removed: Sequence[int], n_tokens: int, protected: int, capacity,
          layers: Optional[Sequence[int]] = None) -> list[int]:
    """Cap each layer at what the method can remove there (ToMe caps r at half the free tokens)."""
    cap_at = _capacity_at(capacity, layers)
    out, n = [], n_tokens
    for i, r in enumerate(removed):
        r = min(r, cap_at(i, n, protected))
        out.append(r)
        n -= r
    return out


def resolve(schedule: Schedule, n_layers: int, n_tokens: int, protected: int, capacity,
            layers: Optional[Sequence[int]] = None) -> list[int]:
    """Per-layer removals, validated. `r` schedules (constant or ramp) are capped per layer the way
    ToMe caps r; explicit `per_layer` lists and `keep` targets are exact, so they are refused with
    the first layer that cannot remove what they ask. `layers`: the only blocks where the method
    removes tokens (None: all)."""
    removed = layer_counts(schedule, n_layers, n_tokens, protected, layers)
    if schedule.r is not None:
        return clamp(removed, n_tokens, protected, capacity, layers)
    if schedule.keep is not None:
        bad = _first_overflow(removed, n_tokens, protected, capacity, layers)
        if bad is not None:
            i, r, cap, n = bad
            lowest = _lowest_keep(n_layers, n_tokens, protected, capacity, layers)
            advice = (f"the lowest keep this model and method can reach is {_ceil_fraction(lowest)}"
                      if lowest is not None else "this method cannot reach it")
            raise UserError(
                f"keep {schedule.keep:g} asks to remove {sum(removed)} of {n_tokens - protected} tokens, "
                f"spread evenly over the layers: layer {i} would remove {r} but only {cap} can go there "
                f"({n} tokens enter it); {advice}: raise keep"
            )
        return removed
    validate(removed, n_tokens, protected, capacity, layers,
             fix="lower per_layer there or earlier")
    return removed


def _ceil_fraction(x: float) -> str:
    """`x` to 3 decimals, rounded up (so that the advised value is itself accepted)."""
    import math

    return f"{math.ceil(x * 1000 - 1e-9) / 1000:g}"
