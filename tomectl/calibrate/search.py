"""The two searches: for a FLOPs budget (family candidates screened, the finalists scored, then an
evolutionary per-layer search) and for a latency budget (bracketed interpolation on GMACs)."""

from __future__ import annotations

import random
from typing import NamedTuple, Optional

from ..errors import UserError
from ..recipe import Recipe
from ..runtime import ProgressFn
from ..schedule import Schedule
from .budget import Budget, _ceil
from .scorer import Scorer
from .space import Candidate, Space, families, family_candidates, mutate

MAX_LATENCY_MEASUREMENTS = 8
SCREEN_IMAGES = 48  # family candidates are first screened on this many images
FINALISTS = 3  # how many screened candidates are scored on all images
PER_GENERATION = 4  # mutants of the per-layer search per generation


def _measure(recipe: Recipe, budget: Budget, threads: Optional[int]):
    """Latency (`bench.LatencyStats`) of a schedule on the budget's backend, at its batch and (trt) its
    precision, with the weights the recipe names (random ones where it names none): the graph
    timed is then byte for byte the one `tomectl export` writes for the chosen artifact."""
    from ..bench import measure_latency

    random = not recipe.weights or recipe.weights.get("source") == "random"
    return measure_latency(recipe, budget.backend, budget.batch, threads=threads, random_weights=random,
                           precision=budget.precision)


class _Ticks:
    """Counts the evaluations of a search for its progress reports."""

    def __init__(self, progress: Optional[ProgressFn], total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, phase: str, report: bool = True) -> None:
        self.done += 1
        if report and self.progress:
            self.progress(phase, self.done, self.total)


# --- FLOPs budgets ------------------------------------------------------------------------------


def search_flops(space: Space, scorer: Optional[Scorer], target_gmacs: float, *, search_evals: int = 12,
                 seed: int = 0, progress: Optional[ProgressFn] = None) -> list[Candidate]:
    """All candidates (families + search) fitting `target_gmacs`, scored where a scorer is given.

    Family candidates are screened on the first 48 images; the 3 best (and constant-r ToMe, the
    usual baseline) are scored on all images; the search then runs on all images."""
    cands = [c for m in space.methods for c in family_candidates(space, m, space.fits(m, target_gmacs))]
    if scorer is None:
        return cands
    ticks = _Ticks(progress, len(cands) + FINALISTS + 1 + search_evals)
    _screen(scorer, cands, ticks)
    if search_evals <= 0 or not cands:
        return cands
    return cands + _evolve(space, scorer, cands, target_gmacs, search_evals, seed, ticks)


def _screen(scorer: Scorer, cands: list[Candidate], ticks: _Ticks, n_finalists: int = FINALISTS,
            eligible=None) -> list[Candidate]:
    """Score every candidate on the screening images, then the best `n_finalists` of the `eligible`
    ones (and constant-r ToMe, the usual baseline) on all of them; returns the finalists."""
    screen = min(SCREEN_IMAGES, len(scorer.images))
    for c in cands:
        scorer.score(c, screen)
        ticks("candidates")
    pool = [c for c in sorted(cands, key=Candidate.rank_key) if eligible is None or eligible(c)]
    finalists = pool[:n_finalists]
    finalists += [c for c in pool if c.family == "constant" and c.method == "tome" and c not in finalists]
    for c in finalists:
        scorer.score(c)
        ticks("candidates")
    return finalists


def _evolve(space: Space, scorer: Scorer, cands: list[Candidate], target_gmacs: float, search_evals: int,
            seed: int, ticks: _Ticks) -> list[Candidate]:
    """The per-layer search from the best candidate (deterministic for a seed): generations of
    mutants; the best of a generation replaces the parent when it ranks better. Returns the new
    candidates, in the order they were scored."""
    rng = random.Random(seed)
    parent = min(cands, key=Candidate.rank_key)
    seen = {(c.method, c.removed) for c in cands}
    found: list[Candidate] = []
    evals = 0
    while evals < search_evals:
        children = []
        for _ in range(min(PER_GENERATION, search_evals - evals)):
            child = mutate(space, parent.method, parent.removed, rng, space.fits(parent.method, target_gmacs))
            evals += 1
            if child is None or (parent.method, child) in seen:
                ticks("search", report=False)
                continue
            seen.add((parent.method, child))
            gmacs = space.gmacs(parent.method, child)
            children.append(scorer.score(Candidate(parent.method, "search", child, gmacs)))
            ticks("search")
        found += children
        if children:
            best = min(children, key=Candidate.rank_key)
            if best.rank_key() < parent.rank_key():
                parent = best
    return found


# --- latency budgets ----------------------------------------------------------------------------


class LatencySearch(NamedTuple):
    """What `search_latency` returns (a tuple: `measured, chosen, base_ms, n_measured = ...`)."""

    measured: list[Candidate]  # every schedule measured, in the order measured
    chosen: int  # index in `measured` of the weakest schedule found within the budget
    base_ms: float  # the unreduced model's latency (p50)
    n_measured: int  # latency measurements taken (<= MAX_LATENCY_MEASUREMENTS)


class _OutOfMeasurements(Exception):
    pass


class _Meter:
    """Latency of constant-r schedules of one method, each r measured once, at most
    MAX_LATENCY_MEASUREMENTS in all (then `_OutOfMeasurements`)."""

    def __init__(self, space: Space, model_name: str, method: str, measure, progress,
                 weights: Optional[dict] = None):
        self.space, self.model_name, self.method, self.weights = space, model_name, method, weights
        self.measure, self.progress = measure, progress
        self.schedule = dict(families(space, method))["constant"]  # r -> per-layer removals
        self.cache: dict[int, tuple[float, float]] = {}  # r -> (p50 ms, spread)
        self.measured: list[Candidate] = []

    def gmacs(self, r: int) -> float:
        return self.space.gmacs(self.method, self.schedule(r))

    def __call__(self, r: int) -> float:
        if r not in self.cache:
            if len(self.cache) >= MAX_LATENCY_MEASUREMENTS:
                raise _OutOfMeasurements
            removed = self.schedule(r)
            rec = Recipe(model=self.model_name, schedule=Schedule(per_layer=removed), method=self.method,
                         weights=self.weights)
            stats = self.measure(rec)
            self.cache[r] = (stats.p50, stats.spread)
            self.measured.append(Candidate(self.method, "constant", removed, self.gmacs(r),
                                           latency_ms=stats.p50, latency_spread=stats.spread,
                                           graph_sha256=getattr(stats, "graph_sha256", None)))
            if self.progress:
                self.progress("latency", len(self.cache), MAX_LATENCY_MEASUREMENTS)
        return self.cache[r][0]


def search_latency(space: Space, model_name: str, method: str, budget: Budget, *,
                   threads: Optional[int] = None, progress: Optional[ProgressFn] = None,
                   measure=None, weights: Optional[dict] = None) -> LatencySearch:
    """Constant-r strength meeting a latency budget: bracketed interpolation on GMACs, <= 8 measurements.

    Returns a `LatencySearch`: (candidates measured, index of the chosen one, base latency ms,
    number of measurements). `measure(recipe)` -> stats with p50 and spread (default: the budget's
    backend, batch and precision). Raises UserError for an infeasible budget with the nearest
    feasible one."""
    measure = measure or (lambda rec: _measure(rec, budget, threads))
    lat = _Meter(space, model_name, method, measure, progress, weights)
    f = lat.schedule
    r_max = next(r for r in range(1, space.n_tokens + 1) if f(r) == f(r + 1))  # strongest distinct r
    base = lat(0)
    target = budget.value if budget.kind == "latency_ms" else base / budget.value
    _check_latency_feasible(lat, budget, base, target, r_max)
    hi = _bracket(lat, target, 0, r_max)
    chosen = next(i for i, c in enumerate(lat.measured) if c.removed == f(hi))
    return LatencySearch(lat.measured, chosen, base, len(lat.cache))


def _check_latency_feasible(lat: _Meter, budget: Budget, base: float, target: float, r_max: int) -> None:
    """Measures the strongest schedule; a UserError with the nearest feasible budget where the
    budget is looser than the unreduced model or tighter than the strongest schedule."""
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


def _bracket(lat: _Meter, target: float, lo: int, hi: int) -> int:
    """Narrow lat(lo) > target >= lat(hi) until adjacent or out of measurements; returns hi. The
    next r is interpolated on GMACs (latency is close to linear in them), the GMACs midpoint where
    the two ends measured the same."""
    try:
        while hi - lo > 1:
            g_lo, g_hi = lat.gmacs(lo), lat.gmacs(hi)
            t_lo, t_hi = lat.cache[lo][0], lat.cache[hi][0]
            # interpolate the GMACs where latency meets the target, then the r with those GMACs
            g_goal = (g_hi + (target - t_hi) * (g_lo - g_hi) / (t_lo - t_hi) if t_lo != t_hi
                      else (g_lo + g_hi) / 2)
            mid = next((r for r in range(lo + 1, hi) if lat.gmacs(r) <= g_goal), hi - 1)
            mid = min(max(mid, lo + 1), hi - 1)
            if lat(mid) <= target:
                hi = mid
            else:
                lo = mid
    except _OutOfMeasurements:
        pass
    return hi
