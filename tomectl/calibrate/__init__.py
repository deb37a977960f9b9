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

Latency budgets (``--latency-ms L`` or ``--speedup S`` on a backend at a batch size, and for trt
at a precision): the strength of constant-r schedules is found by a bracketed search on the target
backend (each measurement in its own process, see `bench.measure_latency`): the next r is
interpolated on GMACs between the bracket's ends (latency is close to linear in GMACs), with a
bisection fallback, reusing every measurement, at most 8 in all. With calibration images, the FLOPs
search then looks for a better schedule at the GMACs found, and one more measurement checks it.

The rooms: `budget` (what must be met, parsed and checked), `space` (candidates, schedule shapes,
relaxation, mutation), `scorer` (agreement and KL against the unreduced model), `search` (the FLOPs
and latency searches), `run` (`calibrate` itself and its result), `report` (calibration.json,
calibration.md, frontier.png).
"""

from .budget import BACKENDS, PRECISIONS, Budget, _ceil, _check_flops_feasible, default_precision
from .report import markdown, plot_frontier, write_reports
from .run import DEFAULT_IMAGES, CalibrationResult, calibrate, chosen_recipe
from .scorer import Scorer
from .search import (
    FINALISTS,
    MAX_LATENCY_MEASUREMENTS,
    SCREEN_IMAGES,
    LatencySearch,
    ProgressFn,
    _measure,
    search_flops,
    search_latency,
)
from .space import (
    Candidate,
    Space,
    _check_methods,
    _space_for,
    _spread,
    _weakest_fitting,
    families,
    family_candidates,
    mutate,
    relax,
    training_free_methods,
)

__all__ = [
    "BACKENDS", "DEFAULT_IMAGES", "FINALISTS", "MAX_LATENCY_MEASUREMENTS", "PRECISIONS", "SCREEN_IMAGES",
    "Budget", "CalibrationResult", "Candidate", "LatencySearch", "ProgressFn", "Scorer", "Space",
    "calibrate", "chosen_recipe", "default_precision", "families", "family_candidates", "markdown",
    "mutate", "plot_frontier",
    "relax", "search_flops", "search_latency", "training_free_methods", "write_reports",
    # used by tests and benchmarks
    "_ceil", "_check_flops_feasible", "_check_methods", "_measure", "_space_for", "_spread",
    "_weakest_fitting",
]
