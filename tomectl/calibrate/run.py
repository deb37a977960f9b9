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
    latency_model: Optional[dict] = None  # what priced the search (latency budgets): key, cache, spread
    model_errors: list[dict] = field(default_factory=list)  # predicted vs measured, per measurement

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
            "latency_model": self.latency_model,
            "model_errors": self.model_errors,
            "tome_twin": next((c.to_dict() for c in self.candidates if c.tome_twin), None),
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
    weights_path: Optional[str] = None
    cache_dir: Optional[str] = None
    refresh: bool = False
    latency_model: Optional[dict] = None
    model_errors: list = field(default_factory=list)
    images: Optional[str] = None  # the calibration images' folder

    def flops(self) -> tuple[list[Candidate], Candidate]:
        budget, space = self.budget, self.space
        target = budget.value * space.base_gmacs if budget.kind == "flops" else budget.value
        _check_flops_feasible(space, target, budget)
        cands = search_flops(space, self.scorer, target, search_evals=self.search_evals, seed=self.seed,
                             progress=self.progress)
        return cands, min(cands, key=Candidate.rank_key)

    def priced(self) -> tuple[list[Candidate], Candidate]:
        """The search priced by the target's latency model (`calibrate.latency`)."""
        from ..latency_model import latency_model
        from .latency import GraphJudge, search_priced

        b = self.budget
        models, info = {}, {}
        asked = list(b.precisions or (b.precision,))
        for p in dict.fromkeys(["fp32", *asked]):
            lm, cached = latency_model(self.model_name, b.backend, precision=p, batch=b.batch,
                                       threads=self.threads, methods=list(self.space.methods),
                                       cache_dir=self.cache_dir, refresh=self.refresh, progress=self.progress)
            models[p] = lm
            info[p] = {"key": lm.key, "cached": cached, "probe_spread": round(lm.spread, 4),
                       "seconds": round(lm.seconds, 1), "whole_ms": round(lm.whole, 4),
                       "gap_ms": round(lm.gap, 4)}
            if not cached:
                self.notes.append(f"measured the latency model of {b.backend} {p} batch {b.batch} "
                                  f"({lm.seconds:.0f} s; cached for the next run)")
        self.latency_model = info
        reference = models["fp32"]
        models = {p: models[p] for p in asked}
        judge = GraphJudge(self.model_name, b, self.weights, self.threads, self.weights_path,
                           images=self.images)
        try:
            res = search_priced(self.space, self.scorer, models, b, judge, search_evals=self.search_evals,
                                seed=self.seed, progress=self.progress, reference=reference)
        finally:
            judge.close()
        self.base_latency, self.n_measured = res.base_ms, res.n_measured
        self.notes += res.notes
        self.model_errors = res.model_errors
        return res.candidates, res.chosen

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
    cache_dir: Optional[str | Path] = None,
    refresh_latency_model: bool = False,
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
    reduced_precision = [p for p in (budget.precisions or (budget.precision,)) if p != "fp32"]
    if budget.is_latency and budget.backend != "trt" and reduced_precision and images is None \
            and not loaded.random_weights:
        from ..export.onnx import shared_calibration_dir

        if shared_calibration_dir() is None:
            raise UserError(f"{reduced_precision[0]} candidates are validated against the unreduced model on "
                            "real images before they are timed: pass --images DIR")
    run = _Run(model_name, budget, space, scorer, search_evals, seed, threads, progress,
               loaded.weights.to_dict(), weights_path=None if weights is None else str(weights),
               cache_dir=None if cache_dir is None else str(cache_dir), refresh=refresh_latency_model,
               images=None if images is None else str(images))
    from ..latency_model import MODEL_BACKENDS

    if not budget.is_latency:
        cands, chosen = run.flops()
    elif budget.backend in MODEL_BACKENDS:
        cands, chosen = run.priced()
    else:  # TensorRT engines: no latency model; constant r bracketed by measuring engines
        cands, chosen = run.latency()
    chosen.chosen = True
    return CalibrationResult(
        model=model_name, budget=budget, base_gmacs=space.base_gmacs, candidates=cands, chosen=chosen,
        n_images=0 if scorer is None else len(scorer.images), images=str(images) if images else None,
        seconds=time.perf_counter() - t0, latency_measurements=run.n_measured,
        base_latency_ms=run.base_latency, notes=run.notes, latency_model=run.latency_model,
        model_errors=run.model_errors,
    )


def chosen_recipe(result: CalibrationResult, weights=None, random_weights: bool = False) -> Recipe:
    """The recipe of the chosen schedule (what the artifact is written from)."""
    w = None
    if random_weights:
        w = {"source": "random"}
    elif weights is not None:
        w = {"source": "file", "path": str(Path(weights).resolve())}
    precision = None  # the graph precision the schedule was measured in: export writes it by default
    chosen_precision = getattr(result.chosen, "precision", None) or result.budget.precision
    if result.budget.is_latency and chosen_precision != "fp32" and result.budget.backend != "trt":
        from ..export.precision import PrecisionOptions

        precision = PrecisionOptions(chosen_precision).key()
    return Recipe(model=result.model, schedule=Schedule(per_layer=result.chosen.removed),
                  method=result.chosen.method, weights=w, precision=precision)
