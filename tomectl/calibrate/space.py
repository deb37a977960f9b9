"""The candidate space: schedules priced by the analytic FLOPs count (no forward pass), their shapes
("families"), relaxation to a budget, and the mutations of the per-layer search."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from ..adapters import adapter_for
from ..errors import UserError
from ..flops import analytic_macs
from ..reduce import METHODS, get_method
from ..schedule import Schedule, clamp, layer_counts

Fits = Callable[[tuple[int, ...]], bool]  # whether a schedule (per-layer removals) meets the budget


@dataclass
class Candidate:
    method: str
    family: str
    removed: tuple[int, ...]
    gmacs: float
    agreement: Optional[float] = None
    kl: Optional[float] = None
    top1: Optional[float] = None
    latency_ms: Optional[float] = None  # p50 of a measurement, where measured
    latency_spread: Optional[float] = None
    graph_sha256: Optional[str] = None  # the graph (or engine) whose latency was measured (ort, trt)
    n_scored: int = 0  # images it was scored on (screening uses a subset)
    chosen: bool = False
    precision: str = "fp32"  # of the graph (latency budgets on ort: fp32 or int8)
    predicted_ms: Optional[float] = None  # the latency model's price (latency budgets)
    tome_twin: bool = False  # constant-r ToMe at the same budget (the baseline the search is against)
    scored_on: Optional[str] = None  # "int8 graph": scored on its own graph rather than in PyTorch
    measured_speedup: Optional[float] = None  # over the unreduced model timed beside it

    @property
    def scored(self) -> bool:
        return self.kl is not None

    def rank_key(self):
        return (-self.n_scored, self.kl, -(self.agreement or 0.0), self.gmacs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed"] = list(self.removed)
        return d


@dataclass
class Space:
    """What the search needs to know of the model: prices schedules without any forward pass."""

    dims: object
    n_layers: int
    n_tokens: int
    protected: int
    base_gmacs: float
    methods: dict  # name -> ReductionMethod
    formulation: str = "scatter"  # the merge formulation candidates are priced in (the budget's backend)

    def acting_layers(self, method: str) -> tuple[int, ...]:
        layers = self.methods[method].layers(self.n_layers)
        return tuple(range(self.n_layers)) if layers is None else tuple(layers)

    def capacity(self, method: str):
        return self.methods[method].capacity

    def clamp(self, method: str, removed: Sequence[int]) -> tuple[int, ...]:
        acting = set(self.acting_layers(method))
        masked = [r if i in acting else 0 for i, r in enumerate(removed)]
        return tuple(clamp(masked, self.n_tokens, self.protected, self.capacity(method)))

    def gmacs(self, method: str, removed: Sequence[int]) -> float:
        return analytic_macs(self.dims, removed, self.methods[method], self.formulation).total / 1e9

    def strongest(self, method: str) -> tuple[int, ...]:
        return self.clamp(method, [10 ** 6] * self.n_layers)

    def fits(self, method: str, target_gmacs: float) -> Fits:
        """Whether a schedule of `method` costs at most `target_gmacs`."""
        return lambda removed: self.gmacs(method, removed) <= target_gmacs + 1e-12


def _space_for(model, methods: Sequence[str], method_options: dict, formulation: str = "scatter") -> Space:
    adapter = adapter_for(model)
    adapter.check_supported(model)
    n_layers = adapter.num_layers(model)
    objs = {}
    for m in methods:
        obj = get_method(m, method_options.get(m))
        if obj.needs_cls_attn and adapter.protected_tokens(model) == 0:
            continue
        objs[m] = obj
    if not objs:
        raise UserError("none of the methods asked for can reduce this model")
    dims = adapter.dims(model)
    base = analytic_macs(dims, [0] * n_layers).total / 1e9
    return Space(dims, n_layers, adapter.num_tokens(model), adapter.protected_tokens(model), base, objs,
                 formulation)


def training_free_methods() -> list[str]:
    return [name for name, cls in METHODS.items() if not getattr(cls, "learned", False)]


def _check_methods(methods: Optional[Sequence[str]]) -> list[str]:
    available = training_free_methods()
    if not methods:
        return available
    bad = [m for m in methods if m not in available]
    if bad:
        raise UserError(f"--method {bad[0]!r} is not a training-free method; "
                        f"available: {', '.join(available)}")
    return list(dict.fromkeys(methods))


def _spread(total: int, layers: Sequence[int], n_layers: int) -> list[int]:
    out = [0] * n_layers
    if not layers:
        return out
    base, extra = divmod(total, len(layers))
    for k, i in enumerate(layers):
        out[i] = base + (1 if k < extra else 0)
    return out


def families(space: Space, method: str) -> list[tuple[str, Callable[[int], tuple[int, ...]]]]:
    """Schedule shapes of one method, each a function strength -> per-layer removals (clamped)."""
    acting = space.acting_layers(method)
    n = space.n_layers
    out: list[tuple[str, Callable[[int], tuple[int, ...]]]] = []

    def shaped(schedule_of):
        def f(r: int) -> tuple[int, ...]:
            return space.clamp(method, layer_counts(schedule_of(r), n, space.n_tokens, space.protected,
                                                    None if len(acting) == n else acting))
        return f

    out.append(("constant", shaped(lambda r: Schedule(r=r))))
    if len(acting) >= 3:
        for inflect in (-1.0, -0.5, 0.5):
            out.append((f"ramp {inflect:+g}", shaped(lambda r, i=inflect: Schedule(r=r, inflect=i))))
    if len(acting) == n and n >= 8:
        # at a quarter, half and three quarters of the depth only (EViT's placement): the merge
        # step's own time is paid three times, not n times
        thirds = [i for i in (round(n * f) for f in (0.25, 0.5, 0.75)) if i in acting]
        out.append(("thirds", lambda r, at=thirds: space.clamp(method, _spread(r * len(at), at, n))))
        for skip in (1, 2, 4):
            late = [i for i in acting if i >= skip]
            out.append((f"late {skip}",
                        lambda r, late=late: space.clamp(method, _spread(r * len(late), late, n))))
    return out


def _weakest_fitting(f: Callable[[int], tuple[int, ...]], fits: Fits, r_max: int) -> Optional[int]:
    """Smallest strength r in [0, r_max] whose schedule fits (schedules get monotonically stronger)."""
    if not fits(f(r_max)):
        return None
    lo, hi = 0, r_max
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(f(mid)):
            hi = mid
        else:
            lo = mid + 1
    return lo


def relax(space: Space, method: str, removed: Sequence[int], fits: Fits) -> tuple[int, ...]:
    """Give removals back, earliest block first, while the schedule still fits the budget."""
    cur = list(removed)
    changed = True
    while changed:
        changed = False
        for i in space.acting_layers(method):
            if cur[i] == 0:
                continue
            trial = cur.copy()
            trial[i] -= 1
            trial_t = space.clamp(method, trial)
            if fits(trial_t):
                cur = list(trial_t)
                changed = True
                break
    return tuple(cur)


def family_candidates(space: Space, method: str, fits: Fits) -> list[Candidate]:
    """One candidate per schedule shape: pushed to the weakest strength that fits, then relaxed."""
    r_max = max(1, space.n_tokens)
    out, seen = [], set()
    for name, f in families(space, method):
        r = _weakest_fitting(f, fits, r_max)
        if r is None:
            continue
        removed = relax(space, method, f(r), fits)
        if removed in seen:
            continue
        seen.add(removed)
        out.append(Candidate(method, name, removed, space.gmacs(method, removed)))
    return out


def mutate(space: Space, method: str, removed: Sequence[int], rng: random.Random,
           fits: Fits) -> Optional[tuple[int, ...]]:
    """Move 1-4 removals from one acting block to another, re-clamp and relax to the budget."""
    acting = space.acting_layers(method)
    if len(acting) < 2:
        return None
    for _ in range(20):
        i, j = rng.sample(acting, 2)
        if removed[i] == 0:
            continue
        step = min(removed[i], rng.choice((1, 2, 4)))
        trial = list(removed)
        trial[i] -= step
        trial[j] += step
        trial_t = space.clamp(method, trial)
        if fits(trial_t) and trial_t != tuple(removed):
            return relax(space, method, trial_t, fits)
    return None
