"""`tomectl calibrate`: the reduction that meets a FLOPs or latency budget with the least accuracy loss.

FLOPs budgets (``--flops F`` of the unreduced GMACs, or ``--gmacs G``):

1. Candidates come from every training-free method asked for and several schedule shapes:
   constant r, linear ramps (inflect -1, -0.5, +0.5), and "late start" schedules that leave the
   first blocks alone. Each shape is pushed to the weakest strength that still fits the budget
   (GMACs from the analytic count: no forward pass), then *relaxed*: removals are given back,
   earliest block first, while the budget still holds.
2. Each candidate is scored on calibration images (unlabelled is fine) against the unreduced
   model, whose logits are computed once: top-1 agreement and mean KL divergence (labels, when the
   images sit in ImageNet wnid folders, add top-1).
3. A small evolutionary search over per-layer removals starts from the best candidate: each
   mutant moves a few removals from one block to another and is relaxed to the budget; the best
   of each generation replaces the parent when it scores better. Deterministic (seeded).

Candidates are ranked by mean KL (smooth on a few hundred images, where agreement moves in steps
of 1/N), agreement breaking ties. The chosen schedule is written as an artifact (the same as
`compress` writes: `export`, `bench`, `eval` take it) with `calibration.json`, `calibration.md` and
`frontier.png` beside it.

Latency budgets (``--latency-ms L`` or ``--speedup S`` on a backend at a batch size): the
strength of constant-r schedules is found by a bracketed search on the target backend (each
measurement in its own process, see `bench.measure_latency`): the next r is interpolated on GMACs
between the bracket's ends (latency is close to linear in GMACs), with a bisection fallback,
reusing every measurement, at most 8 in all. With calibration images, the FLOPs search then
looks for a better schedule at the GMACs found, and one more measurement checks it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .adapters import adapter_for
from .errors import UserError
from .flops import analytic_macs
from .metrics import compare
from .recipe import Recipe
from .reduce import METHODS, get_method
from .schedule import Schedule, clamp, token_counts

BACKENDS = ("torch", "ort", "ort-cuda", "ort-trt", "trt")
MAX_LATENCY_MEASUREMENTS = 8
DEFAULT_IMAGES = 256


# --------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops" (fraction of unreduced GMACs) | "gmacs" | "latency_ms" | "speedup"
    value: float
    backend: str = "torch"
    batch: int = 1

    @property
    def is_latency(self) -> bool:
        return self.kind in ("latency_ms", "speedup")

    def describe(self) -> str:
        return {
            "flops": f"{self.value:g} of the unreduced GMACs",
            "gmacs": f"{self.value:g} GMACs",
            "latency_ms": f"{self.value:g} ms at batch {self.batch} on {self.backend}",
            "speedup": f"{self.value:g}x speedup at batch {self.batch} on {self.backend}",
        }[self.kind]

    @staticmethod
    def parse(flops=None, gmacs=None, latency_ms=None, speedup=None, backend: str = "torch",
              batch: int = 1) -> "Budget":
        given = {k: v for k, v in (("flops", flops), ("gmacs", gmacs), ("latency_ms", latency_ms),
                                   ("speedup", speedup)) if v is not None}
        if len(given) != 1:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in given) or "none"
            raise UserError("give exactly one budget: --flops, --gmacs, --latency-ms or --speedup "
                            f"(got {names})")
        kind, value = next(iter(given.items()))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UserError(f"--{kind.replace('_', '-')} must be a number, got {value!r}")
        value = float(value)
        if kind == "flops" and not 0 < value:
            raise UserError(f"--flops is a fraction of the unreduced GMACs (e.g. 0.6), got {value:g}")
        if kind in ("gmacs", "latency_ms") and value <= 0:
            raise UserError(f"--{kind.replace('_', '-')} must be positive, got {value:g}")
        if kind == "speedup" and value <= 0:
            raise UserError(f"--speedup must be positive (e.g. 2.0), got {value:g}")
        if backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UserError(f"--batch must be a whole number >= 1, got {batch!r}")
        return Budget(kind, value, backend, batch)


# --------------------------------------------------------------------------------------------
# Candidates


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
    n_scored: int = 0  # images it was scored on (screening uses a subset)
    chosen: bool = False

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
        return analytic_macs(self.dims, removed, self.methods[method]).total / 1e9

    def strongest(self, method: str) -> tuple[int, ...]:
        return self.clamp(method, [10 ** 6] * self.n_layers)


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
            from .schedule import layer_counts

            return space.clamp(method, layer_counts(schedule_of(r), n, space.n_tokens, space.protected,
                                                    None if len(acting) == n else acting))
        return f

    out.append(("constant", shaped(lambda r: Schedule(r=r))))
    if len(acting) >= 3:
        for inflect in (-1.0, -0.5, 0.5):
            out.append((f"ramp {inflect:+g}", shaped(lambda r, i=inflect: Schedule(r=r, inflect=i))))
    if len(acting) == n and n >= 8:
        for skip in (1, 2, 4):
            late = [i for i in acting if i >= skip]
            out.append((f"late {skip}",
                        lambda r, late=late: space.clamp(method, _spread(r * len(late), late, n))))
    return out


def _weakest_fitting(f: Callable[[int], tuple[int, ...]], fits: Callable[[tuple[int, ...]], bool],
                     r_max: int) -> Optional[int]:
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


def relax(space: Space, method: str, removed: Sequence[int],
          fits: Callable[[tuple[int, ...]], bool]) -> tuple[int, ...]:
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


def family_candidates(space: Space, method: str, fits) -> list[Candidate]:
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
           fits) -> Optional[tuple[int, ...]]:
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


# --------------------------------------------------------------------------------------------
# Scoring


class Scorer:
    """Scores schedules on fixed calibration images against the unreduced model (computed once)."""

    def __init__(self, model, images: torch.Tensor, labels: Optional[torch.Tensor], method_options: dict,
                 batch_size: int = 64):
        from .evaluate import predict

        self._predict = predict
        self.model = model
        self.images = images
        self.labels = labels if labels is not None and (labels >= 0).any() else None
        self.batch_size = batch_size
        self.options = method_options
        self.cache: dict = {}
        adapter = adapter_for(model)
        self.adapter = adapter
        self._install("tome", [0] * adapter.num_layers(model))  # reduction off: the reference
        self.ref = predict(model, images, batch_size=batch_size)

    def _install(self, method: str, removed: Sequence[int]) -> None:
        from .build import install

        plan = getattr(self.model, "tomectl_plan", None)
        install(self.model, method, removed, prop_attn=True if plan is None else plan.prop_attn,
                formulation="scatter", options=self.options.get(method))

    def score(self, cand: Candidate, n: Optional[int] = None) -> Candidate:
        """Score on the first `n` images (all by default); the cache keeps each (schedule, n)."""
        n = len(self.images) if n is None else min(n, len(self.images))
        key = (cand.method, cand.removed, n)
        if key not in self.cache:
            self._install(cand.method, cand.removed)
            logits = self._predict(self.model, self.images[:n], batch_size=self.batch_size)
            labels = None if self.labels is None else self.labels[:n]
            c = compare(self.ref[:n], logits, labels)
            self.cache[key] = (c.agreement, c.kl, c.top1)
        cand.agreement, cand.kl, cand.top1 = self.cache[key]
        cand.n_scored = n
        return cand


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class CalibrationResult:
    model: str
    budget: Budget
    base_gmacs: float
    candidates: list[Candidate]
    chosen: Candidate
    n_images: int
    images: Optional[str]
    seconds: float
    latency_measurements: int = 0
    base_latency_ms: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    out: Optional[str] = None

    @property
    def gmacs_budget(self) -> Optional[float]:
        if self.budget.kind == "flops":
            return self.budget.value * self.base_gmacs
        if self.budget.kind == "gmacs":
            return self.budget.value
        return None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "budget": asdict(self.budget) | {"description": self.budget.describe()},
            "gmacs_budget": self.gmacs_budget,
            "base_gmacs": self.base_gmacs,
            "base_latency_ms": self.base_latency_ms,
            "chosen": self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "n_images": self.n_images,
            "images": self.images,
            "latency_measurements": self.latency_measurements,
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
            "out": self.out,
        }


def _space_for(model, methods: Sequence[str], method_options: dict) -> Space:
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
    return Space(dims, n_layers, adapter.num_tokens(model), adapter.protected_tokens(model), base, objs)


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


def _check_flops_feasible(space: Space, target: float, budget: Budget) -> None:
    strongest = min(space.gmacs(m, space.strongest(m)) for m in space.methods)
    if target >= space.base_gmacs:
        nearest = 0.99 if budget.kind == "flops" else round(space.base_gmacs * 0.99, 3)
        flag = "--flops" if budget.kind == "flops" else "--gmacs"
        raise UserError(
            f"the budget ({budget.describe()}) is looser than the unreduced model "
            f"({space.base_gmacs:.3f} GMACs): "
            f"nothing to reduce; nearest feasible budget: {flag} {nearest:g}"
        )
    if target < strongest:
        if budget.kind == "flops":
            near = f"--flops {_ceil(strongest / space.base_gmacs, 3):g}"
        else:
            near = f"--gmacs {_ceil(strongest, 3):g}"
        raise UserError(
            f"the budget ({budget.describe()}) is tighter than the strongest schedule allows "
            f"({strongest:.3f} GMACs); nearest feasible budget: {near}"
        )


def _ceil(v: float, digits: int) -> float:
    import math

    f = 10 ** digits
    return math.ceil(v * f) / f


ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


SCREEN_IMAGES = 48  # family candidates are first screened on this many images
FINALISTS = 3  # how many screened candidates are scored on all images


def search_flops(space: Space, scorer: Optional[Scorer], target_gmacs: float, *, search_evals: int = 12,
                 seed: int = 0, progress: Optional[ProgressFn] = None) -> list[Candidate]:
    """All candidates (families + search) fitting `target_gmacs`, scored where a scorer is given.

    Family candidates are screened on the first 48 images; the 3 best (and constant-r ToMe, the
    usual baseline) are scored on all images; the search then runs on all images."""

    def fits_for(method):
        return lambda removed: space.gmacs(method, removed) <= target_gmacs + 1e-12

    cands: list[Candidate] = []
    for m in space.methods:
        cands.extend(family_candidates(space, m, fits_for(m)))
    if scorer is None:
        return cands
    n_all = len(scorer.images)
    screen = min(SCREEN_IMAGES, n_all)
    total = len(cands) + FINALISTS + 1 + search_evals
    done = 0
    for c in cands:
        scorer.score(c, screen)
        done += 1
        if progress:
            progress("candidates", done, total)
    finalists = sorted(cands, key=Candidate.rank_key)[:FINALISTS]
    finalists += [c for c in cands if c.family == "constant" and c.method == "tome" and c not in finalists]
    for c in finalists:
        scorer.score(c)
        done += 1
        if progress:
            progress("candidates", done, total)
    if search_evals <= 0 or not cands:
        return cands
    rng = random.Random(seed)
    parent = min(cands, key=Candidate.rank_key)
    seen = {(c.method, c.removed) for c in cands}
    evals, per_gen = 0, 4
    while evals < search_evals:
        children = []
        for _ in range(min(per_gen, search_evals - evals)):
            child = mutate(space, parent.method, parent.removed, rng, fits_for(parent.method))
            evals += 1
            if child is None or (parent.method, child) in seen:
                done += 1
                continue
            seen.add((parent.method, child))
            c = scorer.score(Candidate(parent.method, "search", child, space.gmacs(parent.method, child)))
            cands.append(c)
            children.append(c)
            done += 1
            if progress:
                progress("search", done, total)
        if children:
            best = min(children, key=Candidate.rank_key)
            if best.rank_key() < parent.rank_key():
                parent = best
    return cands


def _measure(recipe: Recipe, budget: Budget, threads: Optional[int]):
    """Latency of a schedule on the budget's backend (random weights: the time does not depend on them)."""
    from .bench import measure_latency

    return measure_latency(recipe, budget.backend, budget.batch, threads=threads, random_weights=True)


def search_latency(space: Space, model_name: str, method: str, budget: Budget, *,
                   threads: Optional[int] = None, progress: Optional[ProgressFn] = None, measure=None):
    """Constant-r strength meeting a latency budget: bracketed interpolation on GMACs, <= 8 measurements.

    Returns (candidates measured, index of the chosen one, base latency ms). Raises UserError for an
    infeasible budget with the nearest feasible one."""
    measure = measure or (lambda rec: _measure(rec, budget, threads))
    f = dict(families(space, method))["constant"]
    cache: dict[int, tuple[float, float]] = {}  # r -> (p50 ms, spread)
    measured: list[Candidate] = []

    def lat(r: int) -> float:
        if r not in cache:
            if len(cache) >= MAX_LATENCY_MEASUREMENTS:
                raise _OutOfMeasurements
            removed = f(r)
            rec = Recipe(model=model_name, schedule=Schedule(per_layer=removed), method=method)
            stats = measure(rec)
            cache[r] = (stats.p50, stats.spread)
            measured.append(Candidate(method, "constant", removed, space.gmacs(method, removed),
                                      latency_ms=stats.p50, latency_spread=stats.spread))
            if progress:
                progress("latency", len(cache), MAX_LATENCY_MEASUREMENTS)
        return cache[r][0]

    r_max = next(r for r in range(1, space.n_tokens + 1) if f(r) == f(r + 1))  # strongest distinct r
    base = lat(0)
    target = budget.value if budget.kind == "latency_ms" else base / budget.value
    if target >= base:
        raise UserError(
            f"the budget ({budget.describe()}) is looser than the unreduced model "
            f"({base:.2f} ms measured): nothing to reduce; nearest feasible budget: "
            + (f"--latency-ms {base * 0.99:.2f}" if budget.kind == "latency_ms" else "--speedup 1.01")
        )
    strongest = lat(r_max)
    if strongest > target:
        near = (f"--latency-ms {_ceil(strongest, 2):g}" if budget.kind == "latency_ms"
                else f"--speedup {int(base / strongest * 100) / 100:g}")
        raise UserError(
            f"the budget ({budget.describe()}) is tighter than the strongest schedule allows "
            f"({strongest:.2f} ms measured at r={r_max}); nearest feasible budget: {near}"
        )
    lo, hi = 0, r_max  # lat(lo) > target >= lat(hi)
    try:
        while hi - lo > 1:
            g_lo, g_hi = space.gmacs(method, f(lo)), space.gmacs(method, f(hi))
            t_lo, t_hi = cache[lo][0], cache[hi][0]
            # interpolate the GMACs where latency meets the target, then the r with those GMACs
            g_goal = (g_hi + (target - t_hi) * (g_lo - g_hi) / (t_lo - t_hi) if t_lo != t_hi
                      else (g_lo + g_hi) / 2)
            mid = next((r for r in range(lo + 1, hi) if space.gmacs(method, f(r)) <= g_goal), hi - 1)
            mid = min(max(mid, lo + 1), hi - 1)
            if lat(mid) <= target:
                hi = mid
            else:
                lo = mid
    except _OutOfMeasurements:
        pass
    chosen = next(i for i, c in enumerate(measured) if c.removed == f(hi))
    return measured, chosen, base, len(cache)


class _OutOfMeasurements(Exception):
    pass


def calibrate(
    model_name: str,
    budget: Budget,
    *,
    images: Optional[str | Path] = None,
    n_images: int = DEFAULT_IMAGES,
    resize: str = "timm",
    methods: Optional[Sequence[str]] = None,
    weights: Optional[str | Path] = None,
    random_weights: bool = False,
    search_evals: int = 10,
    seed: int = 0,
    threads: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
) -> CalibrationResult:
    """Find the schedule that meets `budget` with the least accuracy loss (see the module docstring)."""
    from . import data, models

    t0 = time.perf_counter()
    methods = _check_methods(methods)
    if n_images < 8:
        raise UserError(f"--n-images must be at least 8, got {n_images}")
    loaded = models.create(model_name, weights=weights, random_weights=random_weights)
    model = loaded.model
    space = _space_for(model, methods, {})
    notes: list[str] = []

    scorer = None
    if images is not None:
        if loaded.random_weights:
            raise UserError("scoring on images needs real weights: drop --random-weights or --images")
        pre = models.preprocessing(model)
        samples = data.scan(images, limit=n_images)
        x = data.load_images(images, pre, n_images, resize=resize)
        y = torch.tensor([s.label for s in samples]) if len(samples) == len(x) else None
        if progress:
            progress("reference", 0, 1)
        scorer = Scorer(model, x, y, {}, batch_size=64)
        if progress:
            progress("reference", 1, 1)
    elif not budget.is_latency:
        raise UserError("a FLOPs budget is calibrated on images: pass --images DIR (unlabelled is fine)")

    base_latency = None
    n_measured = 0
    if budget.is_latency:
        lat_method = "tome" if "tome" in space.methods else next(iter(space.methods))
        measured, idx, base_latency, n_measured = search_latency(
            space, model_name, lat_method, budget, threads=threads, progress=progress)
        cands = list(measured)
        chosen = cands[idx]
        target_lat = budget.value if budget.kind == "latency_ms" else base_latency / budget.value
        if scorer is not None:
            more = search_flops(space, scorer, chosen.gmacs, search_evals=search_evals, seed=seed,
                                progress=progress)
            best = min((c for c in more if c.scored), key=Candidate.rank_key, default=None)
            scorer.score(chosen)
            if best is not None and best.removed != chosen.removed and best.rank_key() < chosen.rank_key() \
                    and n_measured < MAX_LATENCY_MEASUREMENTS:
                rec = Recipe(model=model_name, schedule=Schedule(per_layer=best.removed), method=best.method)
                stats = _measure(rec, budget, threads)
                n_measured += 1
                best.latency_ms, best.latency_spread = stats.p50, stats.spread
                if stats.p50 <= target_lat:
                    chosen = best
                else:
                    notes.append(f"the best-scoring schedule at {best.gmacs:.3f} GMACs "
                                 f"measured {stats.p50:.2f} ms, over the budget: kept constant r")
            cands.extend(c for c in more if c not in cands)
        else:
            notes.append("no --images: chose by latency alone (constant r), without accuracy scoring")
    else:
        target = budget.value * space.base_gmacs if budget.kind == "flops" else budget.value
        _check_flops_feasible(space, target, budget)
        cands = search_flops(space, scorer, target, search_evals=search_evals, seed=seed, progress=progress)
        chosen = min(cands, key=Candidate.rank_key)

    chosen.chosen = True
    return CalibrationResult(
        model=model_name, budget=budget, base_gmacs=space.base_gmacs, candidates=cands, chosen=chosen,
        n_images=0 if scorer is None else len(scorer.images), images=str(images) if images else None,
        seconds=time.perf_counter() - t0, latency_measurements=n_measured, base_latency_ms=base_latency,
        notes=notes,
    )


def chosen_recipe(result: CalibrationResult, weights=None, random_weights: bool = False) -> Recipe:
    w = None
    if random_weights:
        w = {"source": "random"}
    elif weights is not None:
        w = {"source": "file", "path": str(Path(weights).resolve())}
    return Recipe(model=result.model, schedule=Schedule(per_layer=result.chosen.removed),
                  method=result.chosen.method, weights=w)


# --------------------------------------------------------------------------------------------
# Reports


def write_reports(result: CalibrationResult, out_dir: Path, n_tokens: int) -> None:
    """calibration.json, calibration.md and frontier.png into `out_dir` (an artifact being written)."""
    (out_dir / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out_dir / "calibration.md").write_text(markdown(result, n_tokens))
    plot_frontier(result, out_dir / "frontier.png")


def markdown(result: CalibrationResult, n_tokens: int) -> str:
    lines = [
        f"# Calibration: {result.model}",
        "",
        f"- budget: {result.budget.describe()}"
        + (f" = {result.gmacs_budget:.3f} GMACs" if result.gmacs_budget else ""),
        f"- unreduced: {result.base_gmacs:.3f} GMACs"
        + (f", {result.base_latency_ms:.2f} ms" if result.base_latency_ms else ""),
        f"- scored on {result.n_images} images" + (f" from `{result.images}`" if result.images else "")
        + " against the unreduced model (family candidates screened on the first "
        + f"{min(SCREEN_IMAGES, result.n_images)}); ranked by mean KL, then agreement",
        f"- latency measurements: {result.latency_measurements}" if result.budget.is_latency else "",
        f"- time: {result.seconds:.1f} s",
        "",
        "| | method | schedule | removed per layer | final tokens | GMACs | latency ms | images "
        "| agreement | KL | top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def fmt(v, f):
        return "" if v is None else format(v, f)

    for c in sorted(result.candidates,
                    key=lambda c: (not c.chosen, c.kl if c.kl is not None else 9e9, c.gmacs)):
        lines.append(
            f"| {'**chosen**' if c.chosen else ''} | {c.method} | {c.family} | "
            f"{' '.join(map(str, c.removed))} | "
            f"{token_counts(c.removed, n_tokens)[-1]} | {c.gmacs:.3f} | {fmt(c.latency_ms, '.2f')} | "
            f"{c.n_scored or ''} | "
            f"{fmt(c.agreement, '.1%')} | {fmt(c.kl, '.4f')} | {fmt(c.top1, '.1%')} |"
        )
    for n in result.notes:
        lines.append(f"\nNote: {n}")
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot_frontier(result: CalibrationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    # only candidates scored on all images (screened-only ones saw a subset: not comparable)
    scored = [c for c in result.candidates if c.agreement is not None and c.n_scored == result.n_images]
    use_latency = result.budget.is_latency and all(c.latency_ms is not None for c in result.candidates)
    xs_of = (lambda c: c.latency_ms) if use_latency else (lambda c: c.gmacs)
    if scored:
        for method in sorted({c.method for c in scored}):
            pts = [c for c in scored if c.method == method]
            ax.scatter([xs_of(c) for c in pts if xs_of(c) is not None],
                       [100 * c.agreement for c in pts if xs_of(c) is not None],
                       label=method, s=22, alpha=0.8)
        ax.set_ylabel("top-1 agreement with unreduced (%)")
    else:
        pts = [c for c in result.candidates if c.latency_ms is not None]
        ax.plot([c.gmacs for c in pts], [c.latency_ms for c in pts], "o-", label="measured")
        ax.set_ylabel("latency (ms)")
        use_latency = False
    c = result.chosen
    if scored and c.agreement is not None and xs_of(c) is not None:
        ax.scatter([xs_of(c)], [100 * c.agreement], marker="*", s=220, color="crimson", label="chosen",
                   zorder=5)
    budget_x = None
    if result.gmacs_budget and not use_latency:
        budget_x = result.gmacs_budget
    elif use_latency:
        budget_x = result.budget.value if result.budget.kind == "latency_ms" else (
            result.base_latency_ms / result.budget.value if result.base_latency_ms else None)
    if budget_x:
        ax.axvline(budget_x, color="gray", linestyle="--", label="budget")
    ax.set_xlabel("latency (ms)" if use_latency else "GMACs")
    ax.set_title(f"{result.model}: {result.budget.describe()}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
