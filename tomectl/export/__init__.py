"""`tomectl export`: a reduced model as a validated static-shape ONNX graph and/or TensorRT engine.

- `onnx.export_onnx`: torch's ONNX exporter at a fixed batch, onnx.checker, onnxruntime parity
  with PyTorch on real images, optional onnxslim, JSON sidecar. Nothing is written unless every
  check passes.
- `tensorrt.build_engine` / `tensorrt.TrtRunner`: TensorRT 10.x or 11.x from that ONNX, validated
  against onnxruntime, with a metadata JSON; `tensorrt.parse_problems` and `tensorrt.to_fp16`
  need no GPU.
- `export`: what the command does: build the model from a recipe, choose the merge formulation
  for the backend, export, build.

The merge formulation only changes the graph, never the numbers (see reduce/merge.py), so it is
chosen per backend unless asked for:

- TensorRT: "onehot" (Equal + MatMul, no Scatter): "scatter" is a ScatterND with reduction=add,
  which TensorRT refuses (ScatterElements with a reduction runs only through its plugin library).
- onnxruntime (CPU): "onehot" too, by measurement (benchmarks/ort_latency.py --formulations,
  DeiT-S at 224 px, one thread, each session in its own process, shared 2-core machine): the
  onehot graph took 0.94-0.99x the scatter graph's time at r = 8, 13, 16 and batch 1 and 8 (two
  runs), i.e. no slower; so one ONNX file serves both backends. Its extra MatMul grows with the
  square of the token count, so "scatter" may win for high-resolution models: measure there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..recipe import Recipe, check_formulation
from ..reduced import GRAPH_FORMULATION
from .onnx import DEFAULT_CHECK_IMAGES, ExportCheckError, OnnxExportResult, Progress, export_onnx
from .precision import DEFAULT_CHECK_IMAGES as DEFAULT_PRECISION_CHECK
from .precision import PrecisionOptions

# what reduced.Target.formulation_for gives each graph runtime
DEFAULT_FORMULATION = {"onnxruntime": GRAPH_FORMULATION, "tensorrt": GRAPH_FORMULATION}
DEFAULT_CHECK_IMAGES_TRT = 64


@dataclass
class ExportReport:
    model: str
    method: str
    schedule: str
    tokens_per_layer: list[int]
    gmacs_base: float
    gmacs: float
    formulation: str
    formulation_reason: str
    weights: dict = field(default_factory=dict)
    onnx: Optional[OnnxExportResult] = None
    engine: Optional[object] = None  # tensorrt.EngineResult

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("onnx", "engine")}
        d["onnx"] = self.onnx.to_dict() if self.onnx else None
        d["engine"] = self.engine.to_dict() if self.engine else None
        return d


def _check_outputs(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise UserError(f"{p} is a directory; name the file to write")
        for f in (p, p.with_name(p.name + ".json")):
            if f.exists() and not force:
                raise UserError(f"{f} already exists; pass --force to replace it")


def _check_request(onnx_out, trt_out, batch: int, precision: str, check_images, calib_images,
                   force: bool) -> None:
    """Everything about the request that can be refused before any model is built."""
    if onnx_out is None and trt_out is None:
        raise UserError("say what to write: --onnx FILE, --trt FILE, or both")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    if check_images is not None and check_images < 1:
        raise UserError(f"--check-images must be at least 1, got {check_images}")
    _check_outputs([Path(p) for p in (onnx_out, trt_out) if p is not None], force)
    if calib_images is not None and not Path(calib_images).is_dir():
        raise UserError(f"--calib-images {calib_images} is not a folder of images")


def export(
    recipe: Recipe,
    *,
    onnx_out: Optional[str | Path] = None,
    trt_out: Optional[str | Path] = None,
    batch: int = 1,
    precision: Optional[str] = None,
    formulation: Optional[str] = None,
    calib_images: Optional[str | Path] = None,
    check_images: Optional[int] = None,
    simplify: bool = True,
    weights: Optional[str | Path] = None,
    random_weights: bool = False,
    timing_cache: Optional[str | Path] = None,
    workspace_gb: Optional[float] = None,
    min_agreement: Optional[float] = None,
    force: bool = False,
    progress: Progress = None,
    int8_mode: Optional[str] = None,
    calib_method: Optional[str] = None,
    max_agreement_drop: Optional[float] = None,
) -> ExportReport:
    """Build the model `recipe` describes for its target and export it (ONNX, TensorRT or both).

    precision / int8_mode / calib_method: None takes what the recipe records (the precision it was
    calibrated for), else fp32 / dynamic / entropy."""
    from ..build import build
    from ..reduced import Target
    from .onnx import check_inputs_for

    recorded = recipe.precision if trt_out is None else None
    asked = PrecisionOptions.of(recorded, precision=precision, int8_mode=int8_mode, calib_method=calib_method)
    precision = asked.precision
    _check_request(onnx_out, trt_out, batch, precision, check_images, calib_images, force)
    if formulation is not None:
        check_formulation(formulation, "--formulation")
    tensorrt = None
    if trt_out is not None:  # fail before the minutes of export when TensorRT cannot run here
        from . import tensorrt

        tensorrt.plan_build(tensorrt.require_tensorrt().__version__, precision)
    target = Target.for_export(trt_out is not None, batch, precision, formulation)
    reduced = build(recipe, weights=weights, random_weights=random_weights, target=target)
    # an engine is built from the fp32 graph (TensorRT converts); an ONNX file is written in `precision`,
    # validated against the unreduced model unless the weights are random (nothing to agree with)
    popts = PrecisionOptions(precision if trt_out is None else "fp32", asked.int8_mode, asked.calib_method,
                             calib_images, n_calib=asked.n_calib,
                             n_check=check_images or DEFAULT_PRECISION_CHECK, margin=max_agreement_drop,
                             validate=not reduced.loaded.random_weights)
    formulation, reason = target.formulation_for(recipe.formulation)
    n = check_images or (DEFAULT_CHECK_IMAGES_TRT if trt_out is not None else DEFAULT_CHECK_IMAGES)
    if progress:
        progress("loading check images...")
    inputs = check_inputs_for(reduced.model, max(n, batch), calib_images)
    report = ExportReport(
        model=recipe.model, method=recipe.method, schedule=recipe.schedule.describe(),
        tokens_per_layer=reduced.tokens, gmacs_base=reduced.base_macs().gmacs, gmacs=reduced.macs().gmacs,
        formulation=formulation, formulation_reason=reason, weights=reduced.loaded.weights.to_dict(),
    )
    with tempfile.TemporaryDirectory(prefix="tomectl-export-") as td:
        onnx_path = Path(onnx_out) if onnx_out is not None else Path(td) / "model.onnx"
        report.onnx = reduced.export_onnx(onnx_path, check_inputs=inputs, simplify=simplify,
                                          progress=progress, precision=popts)
        if onnx_out is None:
            report.onnx.path = report.onnx.sidecar = None
        if trt_out is not None:
            kwargs = {} if workspace_gb is None else {"workspace_gb": workspace_gb}
            calib, check = tensorrt.engine_images(inputs.images, precision, batch)  # disjoint for int8
            reference = tensorrt.unreduced_logits(reduced, check) if precision != "fp32" else None
            report.engine = tensorrt.build_engine(
                onnx_path, trt_out, precision=precision, batch=batch, calib_images=calib,
                check_images=check, reference=reference, max_agreement_drop=max_agreement_drop,
                timing_cache=timing_cache, min_agreement=min_agreement,
                meta={**reduced.sidecar_meta(), "formulation": formulation}, progress=progress, **kwargs,
            )
    return report


__all__ = [
    "DEFAULT_FORMULATION",
    "ExportCheckError",
    "ExportReport",
    "OnnxExportResult",
    "export",
    "export_onnx",
]
