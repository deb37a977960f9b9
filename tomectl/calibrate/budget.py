"""What a calibration must meet: a FLOPs or latency budget, parsed and checked in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..errors import UserError
from ..reduced import BACKENDS

if TYPE_CHECKING:
    from .space import Space

# of the graph (ort: int8 on CPU; fp16 on the CUDA providers) or the engine (trt) a latency budget is
# measured on
PRECISIONS = ("fp32", "fp16", "int8")
_PRECISION_BACKENDS = {"int8": ("trt", "ort", "ort-cuda", "ort-trt"), "fp16": ("trt", "ort-cuda", "ort-trt")}


def default_precision(budget: "Budget", images: bool) -> "Budget":
    """`budget` searching what `tomectl calibrate` searches when --precision is not given: fp32 and
    int8 for a latency budget on onnxruntime CPU with calibration images (the int8 graphs are
    validated on them), fp32 (the budget as parsed) otherwise. Measured
    (`benchmarks/results/calibrate_latency.md`, DeiT-Tiny, shared weights, onnxruntime CPU, batch 1,
    1 thread, agreement with the unreduced model on 1,300 val images): at
    --speedup 1.5 the fp32 search chose ToMe at 1.54x and 91.8 %, the fp32+int8 search the int8
    unreduced graph at 1.78x and 98.6 %; at --speedup 1.8, fp32 81.9 % against 97.9 %."""
    if budget.is_latency and budget.backend == "ort" and images:
        return replace(budget, precision="fp32", precisions=("fp32", "int8"))
    return budget


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops" (fraction of unreduced GMACs) | "gmacs" | "latency_ms" | "speedup"
    value: float
    backend: str = "torch"
    batch: int = 1
    precision: str = "fp32"  # of the graph or engine timed (torch backends run fp32)
    precisions: tuple = ()  # latency budgets: every precision searched (the chosen one's is recorded)

    @property
    def is_latency(self) -> bool:
        return self.kind in ("latency_ms", "speedup")

    def describe(self) -> str:
        shown = ",".join(self.precisions) if len(self.precisions) > 1 else self.precision
        where = f"batch {self.batch} on {self.backend}" + (f" {shown}" if shown != "fp32" else "")
        return {
            "flops": f"{self.value:g} of the unreduced GMACs",
            "gmacs": f"{self.value:g} GMACs",
            "latency_ms": f"{self.value:g} ms at {where}",
            "speedup": f"{self.value:g}x speedup at {where}",
        }[self.kind]

    @staticmethod
    def parse(flops=None, gmacs=None, latency_ms=None, speedup=None, backend: str = "torch",
              batch: int = 1, precision: str = "fp32") -> "Budget":
        asked = [p.strip() for p in str(precision).split(",") if p.strip()]
        bad = [p for p in asked if p not in PRECISIONS] or ([] if asked else [precision])
        if bad:
            raise UserError(f"--precision must be one or more of {', '.join(PRECISIONS)} (comma-separated), "
                            f"got {bad[0]!r}")
        asked = list(dict.fromkeys(asked))
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
        for p in asked:
            if p != "fp32" and not (backend in _PRECISION_BACKENDS[p] and kind in ("latency_ms", "speedup")):
                raise UserError(f"--precision {p} applies to latency budgets on --backend "
                                f"{', '.join(_PRECISION_BACKENDS[p])}; the other backends run fp32")
        if len(asked) > 1 and backend == "trt":
            raise UserError("--backend trt calibrates one precision at a time (give one --precision)")
        return Budget(kind, value, backend, batch, asked[0], tuple(asked))


def _check_flops_feasible(space: "Space", target: float, budget: Budget) -> None:
    """A one-line UserError naming the nearest feasible budget where `target` GMACs cannot be met."""
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
    f = 10 ** digits
    return math.ceil(v * f) / f
