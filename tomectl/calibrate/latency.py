"""The search for a latency budget, priced by the target's latency model (`tomectl.latency_model`).

1. Budgets are ratios to the unreduced fp32 model timed in the same rounds (a ``--latency-ms``
   budget: the unreduced time over it), because a shared machine moves absolute times between
   processes far more than the ratio of two configurations timed round-robin in one.
2. Every training-free method, schedule shape and precision asked for is pushed to the weakest
   strength whose *predicted* latency meets the budget (the latency model prices a schedule in
   microseconds, so the whole space is priced, not a few points of it); an int8 graph of the
   unreduced model is a candidate too.
3. The candidates are scored as for a FLOPs budget (screened on 48 images, the finalists on all of
   them, then the per-layer search from the best one, priced by predicted latency). Reduced
   precision changes the decisions, so a candidate in fp16/int8 is ranked by the score of its own
   graph on the calibration images (the best few by their fp32 score are scored that way).
4. The finalists are measured for real, best-ranked first, each beside the unreduced model, until
   one meets the budget: that one is chosen, with its measured latency, spread and speedup.
   Constant-r ToMe at the budget (the usual baseline, "ToMe twin") is measured too, for the
   frontier and for `tomectl bench --compare-tome`. At most
   `MAX_LATENCY_MEASUREMENTS` real whole-model measurements in all (the model's table does not
   count). A measurement under the budget prices its own precision again (each precision has its
   own table, and its own errors), asking that precision's predictions for as much more speedup as
   the measurement fell short by; a reduced precision whose stronger schedule measured no faster
   than its weaker one leaves the search at that budget.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from ..recipe import Recipe
from ..runtime import ProgressFn
from ..schedule import Schedule
from .budget import Budget, _ceil
from .scorer import Scorer
from .search import MAX_LATENCY_MEASUREMENTS, _evolve, _screen, _Ticks
from .space import Candidate, Space, family_candidates

# reduced-precision candidates scored on their own graph, per precision and round: at budgets past
# what fp32 reduction reaches well (1.8x on DeiT-Tiny, onnxruntime), int8 candidates are the race
GRAPH_SCORED = 4
# screened candidates scored on all images: more than a FLOPs budget's 3, because the prices of
# shapes that act at few blocks and of ones that act at all of them differ more in time than in FLOPs
FINALISTS = 6
# candidates are priced this far under the budget: the latency model's median error on whole models
# (measured: benchmarks/latency_model.py), so that the chosen one measures within the budget
PRICE_MARGIN = 0.03
STALL = 0.02  # a stronger reduction of one precision must measure this much faster than the last


@dataclass
class GraphJudge:
    """Exports a candidate's graph once (in its precision) and times and scores that same file."""

    model_name: str
    budget: Budget
    weights: Optional[dict]
    threads: Optional[int]
    weights_path: Optional[str] = None
    images: Optional[str] = None  # the calibration images: reduced-precision graphs are validated on them
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tomectl-cal-")))
    files: dict = field(default_factory=dict)

    def recipe(self, c: Candidate) -> Recipe:
        return Recipe(model=self.model_name, schedule=Schedule(per_layer=c.removed), method=c.method,
                      weights=self.weights)

    @property
    def random(self) -> bool:
        return not self.weights or self.weights.get("source") == "random"

    def graph(self, c: Candidate) -> Path:
        from ..bench import export_for_bench

        key = (c.method, c.removed, c.precision)
        if key not in self.files:
            path = self.workdir / f"cand{len(self.files)}.onnx"
            export_for_bench(self.recipe(c), self.budget.batch, onnx_out=path, weights=self.weights_path,
                             random_weights=self.random, precision=c.precision, check_images=self.images)
            self.files[key] = path
        return self.files[key]

    def measure(self, cands: list[Candidate]) -> list:
        """Latency stats of `cands`, timed side by side (round-robin, 6 rounds over 3 fresh processes:
        `bench.time_side_by_side`)."""
        from ..bench import measure_side_by_side

        ort = self.budget.backend.startswith("ort")
        configs = [(self.recipe(c), self.graph(c) if ort else None) for c in cands]
        return measure_side_by_side(configs, self.budget.backend, self.budget.batch, threads=self.threads,
                                    weights=self.weights_path, random_weights=self.random)

    def logits(self, c: Candidate, images):
        import torch

        from ..runtime import ort_session, run_session

        sess = ort_session(self.graph(c), threads=self.threads)
        return torch.from_numpy(run_session(sess, images))

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _score_graph(scorer: Scorer, judge: GraphJudge, c: Candidate) -> Candidate:
    from ..metrics import compare

    logits = judge.logits(c, scorer.images)
    cmp = compare(scorer.ref, logits, scorer.labels)
    c.agreement, c.kl, c.top1, c.n_scored = cmp.agreement, cmp.kl, cmp.top1, len(scorer.images)
    c.scored_on = f"{c.precision} graph"
    return c


@dataclass
class PricedResult:
    candidates: list[Candidate]
    chosen: Candidate
    base_ms: float
    n_measured: int
    twin: Optional[Candidate]
    notes: list[str]
    model_errors: list[dict]  # predicted vs measured of every measured schedule


def priced_candidates(space: Space, models: dict, target_ms: float) -> list[Candidate]:
    """Every method x shape x precision at the weakest strength predicted within `target_ms`."""
    out = []
    for precision, lm in models.items():
        for m in space.methods:
            def fits(removed, m=m, lm=lm):
                return lm.predict(m, removed) <= target_ms
            for c in family_candidates(space, m, fits):
                if not any(c.removed):  # the unreduced graph: one candidate of its own below
                    continue
                c.precision, c.predicted_ms = precision, lm.predict(m, c.removed)
                out.append(c)
        if precision != "fp32":
            zero = tuple([0] * space.n_layers)
            m = next(iter(space.methods))
            pred = lm.predict(m, zero)
            if pred <= target_ms:
                out.append(Candidate(m, "unreduced", zero, space.base_gmacs, precision=precision,
                                     predicted_ms=pred))
    return out


def _check_feasible(space: Space, models: dict, budget: Budget, whole: float, goal: float,
                    base_ms: Optional[float]) -> None:
    """A one-line UserError with the nearest feasible budget (`goal`: the speedup asked for)."""
    def flag(speedup: float) -> str:
        if budget.kind == "latency_ms" and base_ms:
            return f"--latency-ms {_ceil(base_ms / speedup, 2):g}"
        return f"--speedup {int(speedup * 100) / 100:g}"

    if goal <= 1.0 and list(models) == ["fp32"]:
        raise UserError(f"the budget ({budget.describe()}) is looser than the unreduced model: nothing to "
                        f"reduce; nearest feasible budget: {flag(1.01)}")
    fastest = min(lm.predict(m, space.strongest(m)) for lm in models.values() for m in space.methods)
    if whole / fastest < goal:
        raise UserError(f"the budget ({budget.describe()}) is tighter than the strongest schedule allows "
                        f"({whole / fastest:.2f}x predicted); nearest feasible budget: "
                        f"{flag(whole / fastest)}")


def search_priced(space: Space, scorer: Optional[Scorer], models: dict, budget: Budget, judge: GraphJudge, *,
                  search_evals: int = 10, seed: int = 0, progress: Optional[ProgressFn] = None,
                  measure: Optional[Callable] = None, reference=None) -> PricedResult:
    """See the module docstring. `models`: precision -> LatencyModel searched; `reference`: the fp32
    model (default models["fp32"]). `measure(candidates)` -> their stats timed side by side
    (default: `judge.measure`).

    Everything is judged in ratios to the unreduced fp32 model timed in the same rounds: a shared
    machine moves absolute times between processes by tens of percent, while the ratio of two
    configurations timed round-robin holds far better (and better still over several processes:
    `bench.time_side_by_side`). A ``--latency-ms`` budget becomes the
    ratio (unreduced time / budget), the unreduced time measured beside each finalist."""
    measure = measure or judge.measure
    notes: list[str] = []
    errors: list[dict] = []
    zero = tuple([0] * space.n_layers)
    lm32 = reference or models.get("fp32")
    if lm32 is None:
        raise ValueError("the fp32 latency model is the reference of the others")
    first = next(iter(space.methods))
    base = Candidate(first, "unreduced", zero, space.base_gmacs, precision="fp32", predicted_ms=lm32.whole)
    n_measured = 0
    others = [p for p in models if p != "fp32"]
    base_ms = None
    if others or budget.kind == "latency_ms":
        # the unreduced model (and its reduced-precision graphs, which anchor their tables on the
        # fp32 one: the tables were measured at different times)
        zeros = [Candidate(first, "unreduced", zero, space.base_gmacs, precision=p) for p in others]
        stats = measure([base, *zeros])
        n_measured += len(stats)
        base_ms = stats[0].p50
        base.latency_ms, base.latency_spread = base_ms, stats[0].spread
        for p, st in zip(others, stats[1:], strict=True):
            models[p] = models[p].anchored(lm32.whole * st.p50 / base_ms)
    goal = budget.value if budget.kind == "speedup" else base_ms / budget.value
    _check_feasible(space, models, budget, lm32.whole, goal, base_ms)
    aim = goal * (1 + PRICE_MARGIN)  # the predicted speedup candidates are priced at
    # A measurement over the budget corrects the prices of its own precision only: each precision has
    # its own table and its own errors (onnxruntime's int8 graphs keep their float decision nodes and
    # quantize/dequantize steps, whose cost the int8 table under-predicts most where the reduction is
    # strongest). One correction for all of them once took an int8 miss of 16-32 % out on the fp32
    # candidates, which the fp32 table predicted within 3 %: the search then chose a 2.96x schedule
    # for a 2.0x budget, at 30 % agreement, beside 2.0x fp32 schedules at 75 %.
    scale = {p: 1.0 for p in models}  # measured / predicted, per precision, so far
    # A reduced precision whose stronger reduction measured no faster than its weaker one has hit a
    # floor its table does not have (int8 on onnxruntime: the float merge steps and the quantize
    # steps): it leaves the search at this budget rather than take every remaining measurement.
    last: dict = {}  # precision -> its last measured speedup
    dropped: set = set()

    def priced() -> dict:
        return {p: lm.anchored(lm.whole * scale[p]) for p, lm in models.items() if p not in dropped}

    everything: list[Candidate] = []
    chosen = twin = None
    while n_measured < MAX_LATENCY_MEASUREMENTS - 1:  # one kept for the ToMe twin
        prices = priced()
        # a schedule is one candidate however often the prices admit it (by its key, not its fields:
        # an earlier round's copy carries its scores)
        known = {_key(c): c for c in everything}
        fresh = priced_candidates(space, prices, lm32.whole / aim)
        cands = [c for c in fresh if _key(c) not in known]
        twin = next((known.get(_key(c), c) for c in fresh if c.method == "tome" and c.family == "constant"
                     and c.precision == "fp32"), twin)
        for c in cands:
            c.tome_twin = c is twin
        if scorer is None:
            ranked = [twin] if twin is not None else sorted(cands, key=lambda c: -c.predicted_ms)[:1]
        else:
            ranked = _score_all(space, scorer, prices, cands, lm32.whole / aim, judge,
                                search_evals if not everything else 0, seed, progress)
            # candidates scored in an earlier round that the new prices still admit stay in the race
            full = len(scorer.images)
            for c in everything:
                if c.latency_ms is None and c.predicted_ms is not None and c.precision in prices:
                    c.predicted_ms = prices[c.precision].predict(c.method, c.removed)
            ranked = sorted(ranked + [c for c in everything if c.latency_ms is None and c.n_scored == full
                                      and c.precision in prices
                                      and (c.precision == "fp32" or c.scored_on)
                                      and lm32.whole / c.predicted_ms >= aim
                                      and id(c) not in {id(r) for r in ranked}],
                            key=Candidate.rank_key)
        everything += cands  # new schedules only (and the per-layer search's, none of them known)
        if not ranked:
            break
        best = ranked[0]
        b_stats, stats = measure([base, best])
        n_measured += 1
        now = goal if budget.kind == "speedup" else b_stats.p50 / budget.value
        priced_ms = best.predicted_ms
        if priced_ms is not None:  # the model's own error, without the corrections made so far
            best.predicted_ms = models[best.precision].predict(best.method, best.removed)
        _take(best, stats, errors, lm32.whole, b_stats.p50)
        best.measured_speedup = b_stats.p50 / stats.p50
        if best.measured_speedup >= now:
            chosen, goal = best, now
            break
        if priced_ms is None:
            continue
        p = best.precision
        if p != "fp32" and p in last and best.measured_speedup < last[p] * (1 + STALL):
            dropped.add(p)
            notes.append(f"{best.method} {best.family} {p}: measured {best.measured_speedup:.2f}x, no faster "
                         f"than the weaker {p} schedule before it ({last[p]:.2f}x): {p} left the search at "
                         f"this budget")
            continue
        last[p] = best.measured_speedup  # faster than the one before it, or it would have left
        predicted = lm32.whole / priced_ms
        scale[p] *= predicted / best.measured_speedup * (1 + PRICE_MARGIN / 2)
        if budget.kind == "latency_ms":  # the budget's ratio moved with the unreduced model's time
            aim = now * (1 + PRICE_MARGIN)
        notes.append(f"{best.method} {best.family} {p}: predicted {predicted:.2f}x, measured "
                     f"{best.measured_speedup:.2f}x beside the unreduced model, under the budget "
                     f"({now:.2f}x): {p} candidates priced again, {scale[p]:.2f}x slower than their table")
    for c in everything:
        c.tome_twin = c is twin
    if chosen is None:
        raise UserError(f"no schedule measured within the budget ({budget.describe()}) in {n_measured} "
                        "measurements; try a looser budget")
    if scorer is None:
        notes.append("no --images: chose by predicted latency alone (constant-r ToMe), without accuracy "
                     "scoring")
    # the chosen one, its ToMe twin and the unreduced model, side by side: what the report states
    final = [base, chosen] + ([twin] if twin is not None and twin is not chosen else [])
    stats = measure(final)
    n_measured += len(final) - 2
    for c, st in zip(final, stats, strict=True):
        c.latency_ms, c.latency_spread = st.p50, st.spread
        c.graph_sha256 = getattr(st, "graph_sha256", None) or c.graph_sha256
        c.measured_speedup = stats[0].p50 / st.p50
    if twin is not None and twin is not chosen and twin.predicted_ms is not None:
        raw = models[twin.precision].predict(twin.method, twin.removed)
        errors.append(_error_row(twin, raw * stats[0].p50 / lm32.whole, stats[2]))
    for c in everything:  # the models' own predictions, in ms of the unreduced model's final measurement
        if c.predicted_ms is not None:
            c.predicted_ms = models[c.precision].predict(c.method, c.removed) * stats[0].p50 / lm32.whole
    final_goal = goal if budget.kind == "speedup" else stats[0].p50 / budget.value
    if chosen.measured_speedup < final_goal:
        notes.append(f"timed again beside the unreduced model, the chosen schedule measured "
                     f"{chosen.measured_speedup:.2f}x against a budget of {final_goal:.2f}x: within the "
                     "measurement's noise of the budget")
    return PricedResult(everything, chosen, stats[0].p50, n_measured, twin, notes, errors)


def _score_all(space, scorer, models, cands, target, judge, search_evals, seed, progress) -> list[Candidate]:
    """Screen, score the finalists on all images, search per layer, score reduced-precision ones on
    their own graphs; returns the candidates with a full score, best first."""
    ticks = _Ticks(progress, len(cands) + FINALISTS + 1 + search_evals)
    # reduced-precision candidates are screened on their fp32 score, and scored on their own graph below
    finalists = _screen(scorer, cands, ticks, FINALISTS, eligible=lambda c: c.precision == "fp32")
    if search_evals > 0 and "fp32" in models and finalists:
        lm = models["fp32"]
        found = _evolve(_PricedSpace(space, lm), scorer, finalists, target, search_evals, seed, ticks)
        for c in found:
            c.precision, c.predicted_ms = "fp32", lm.predict(c.method, c.removed)
        cands.extend(found)
    for precision in models:
        if precision == "fp32":
            continue
        low = sorted((c for c in cands if c.precision == precision), key=Candidate.rank_key)[:GRAPH_SCORED]
        for c in low:
            if progress:
                progress(f"{precision} graphs", low.index(c), len(low))
            try:
                _score_graph(scorer, judge, c)
            except UserError:  # its graph was refused by the precision check: not a candidate
                c.scored_on = None
    full = len(scorer.images)
    return sorted((c for c in cands if c.n_scored == full and (c.precision == "fp32" or c.scored_on)),
                  key=Candidate.rank_key)


class _PricedSpace:
    """A Space whose `fits` and `gmacs` the per-layer search uses, with fits priced by predicted
    latency (the search's `target` is then in ms)."""

    def __init__(self, space: Space, lm):
        self._space, self._lm = space, lm

    def __getattr__(self, name):
        return getattr(self._space, name)

    def fits(self, method: str, target_ms: float):
        return lambda removed: self._lm.predict(method, removed) <= target_ms


def _key(c: Candidate) -> tuple:
    return (c.method, tuple(c.removed), c.precision)


def _error_row(c: Candidate, predicted: float, stats) -> dict:
    return {"method": c.method, "precision": c.precision, "removed": list(c.removed),
            "predicted_ms": round(predicted, 4), "measured_ms": round(stats.p50, 4),
            "error": round(predicted / stats.p50 - 1, 4), "spread": round(stats.spread, 4)}


def _take(c: Candidate, stats, errors, lm_whole: float, base_ms: float) -> None:
    """Record a measurement, and the model's error on it (its prediction in the units of the
    unreduced model timed beside it)."""
    c.latency_ms, c.latency_spread = stats.p50, stats.spread
    c.graph_sha256 = getattr(stats, "graph_sha256", None)
    if c.predicted_ms is not None:
        errors.append(_error_row(c, c.predicted_ms * base_ms / lm_whole, stats))
