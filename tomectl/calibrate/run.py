"""One calibration run: the model and its space, the scorer, the search the budget needs, the result."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import UserError
from ..recipe import Recipe
from ..reduced import Target
from ..schedule import Schedule
from .budget import Budget, _check_flops_feasible
from .scorer import Scorer
from .search import MAX_LATENCY_MEASUREMENTS, ProgressFn, _measure, search_flops, search_latency
from .space import Candidate, Space, _check_methods, _space_for

DEFAULT_IMAGES = 256


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


@dataclass
class _Run:
    """What the two kinds of budget share while they search; they add notes and measurements."""

    model_name: str
    budget: Budget
    space: Space
    scorer: Optional[Scorer]
    search_evals: int
    seed: int
    threads: Optional[int]
    progress: Optional[ProgressFn]
    weights: Optional[dict] = None  # the model's weights (WeightsInfo.to_dict), for latency measurements
    notes: list[str] = field(default_factory=list)
    base_latency: Optional[float] = None
    n_measured: int = 0

    def flops(self) -> tuple[list[Candidate], Candidate]:
        budget, space = self.budget, self.space
        target = budget.value * space.base_gmacs if budget.kind == "flops" else budget.value
        _check_flops_feasible(space, target, budget)
        cands = search_flops(space, self.scorer, target, search_evals=self.search_evals, seed=self.seed,
                             progress=self.progress)
        return cands, min(cands, key=Candidate.rank_key)

    def latency(self) -> tuple[list[Candidate], Candidate]:
        """Constant r by measurement; with a scorer, the best-scoring schedule at the GMACs found
        replaces it if one more measurement shows it within the budget."""
        lat_method = "tome" if "tome" in self.space.methods else next(iter(self.space.methods))
        measured, idx, self.base_latency, self.n_measured = search_latency(
            self.space, self.model_name, lat_method, self.budget, threads=self.threads,
            progress=self.progress, weights=self.weights)
        cands = list(measured)
        chosen = cands[idx]
        if self.scorer is None:
            self.notes.append("no --images: chose by latency alone (constant r), without accuracy scoring")
            return cands, chosen
        more = search_flops(self.space, self.scorer, chosen.gmacs, search_evals=self.search_evals,
                            seed=self.seed, progress=self.progress)
        best = min((c for c in more if c.scored), key=Candidate.rank_key, default=None)
        self.scorer.score(chosen)
        if best is not None and best.removed != chosen.removed and best.rank_key() < chosen.rank_key() \
                and self.n_measured < MAX_LATENCY_MEASUREMENTS:
            chosen = self._check_at_latency(best, chosen)
        cands.extend(c for c in more if c not in cands)
        return cands, chosen

    def _check_at_latency(self, best: Candidate, chosen: Candidate) -> Candidate:
        budget = self.budget
        target = budget.value if budget.kind == "latency_ms" else self.base_latency / budget.value
        rec = Recipe(model=self.model_name, schedule=Schedule(per_layer=best.removed), method=best.method,
                     weights=self.weights)
        stats = _measure(rec, budget, self.threads)
        self.n_measured += 1
        best.latency_ms, best.latency_spread = stats.p50, stats.spread
        best.graph_sha256 = getattr(stats, "graph_sha256", None)
        if stats.p50 <= target:
            return best
        self.notes.append(f"the best-scoring schedule at {best.gmacs:.3f} GMACs "
                          f"measured {stats.p50:.2f} ms, over the budget: kept constant r")
        return chosen


def _scorer(loaded, images, n_images: int, resize: str, progress: Optional[ProgressFn]) -> Scorer:
    """The scorer on the first `n_images` calibration images (labels where they sit in wnid folders)."""
    from .. import data, models

    if loaded.random_weights:
        raise UserError("scoring on images needs real weights: drop --random-weights or --images")
    pre = models.preprocessing(loaded.model)
    samples = data.scan(images, limit=n_images)
    x = data.load_images(images, pre, n_images, resize=resize)
    y = torch.tensor([s.label for s in samples]) if len(samples) == len(x) else None
    if progress:
        progress("reference", 0, 1)
    scorer = Scorer(loaded.model, x, y, {}, batch_size=64)
    if progress:
        progress("reference", 1, 1)
    return scorer


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
    """Find the schedule that meets `budget` with the least accuracy loss (see the package docstring)."""
    from .. import models

    t0 = time.perf_counter()
    methods = _check_methods(methods)
    if n_images < 8:
        raise UserError(f"--n-images must be at least 8, got {n_images}")
    loaded = models.create(model_name, weights=weights, random_weights=random_weights)
    formulation, _ = Target(budget.backend if budget.is_latency else "torch").formulation_for("scatter")
    space = _space_for(loaded.model, methods, {}, formulation)
    scorer = None
    if images is not None:
        scorer = _scorer(loaded, images, n_images, resize, progress)
    elif not budget.is_latency:
        raise UserError("a FLOPs budget is calibrated on images: pass --images DIR (unlabelled is fine)")
    run = _Run(model_name, budget, space, scorer, search_evals, seed, threads, progress,
               loaded.weights.to_dict())
    cands, chosen = run.latency() if budget.is_latency else run.flops()
    chosen.chosen = True
    return CalibrationResult(
        model=model_name, budget=budget, base_gmacs=space.base_gmacs, candidates=cands, chosen=chosen,
        n_images=0 if scorer is None else len(scorer.images), images=str(images) if images else None,
        seconds=time.perf_counter() - t0, latency_measurements=run.n_measured,
        base_latency_ms=run.base_latency, notes=run.notes,
    )


def chosen_recipe(result: CalibrationResult, weights=None, random_weights: bool = False) -> Recipe:
    """The recipe of the chosen schedule (what the artifact is written from)."""
    w = None
    if random_weights:
        w = {"source": "random"}
    elif weights is not None:
        w = {"source": "file", "path": str(Path(weights).resolve())}
    precision = None  # the graph precision the schedule was measured in: export writes it by default
    if result.budget.is_latency and result.budget.precision != "fp32" and result.budget.backend != "trt":
        from ..export.precision import PrecisionOptions

        precision = PrecisionOptions(result.budget.precision).key()
    return Recipe(model=result.model, schedule=Schedule(per_layer=result.chosen.removed),
                  method=result.chosen.method, weights=w, precision=precision)
