"""`tomectl eval`: accuracy of a (reduced) model, and how far it moved from the unreduced one.

A target is a torch model (a `Recipe`, or an already `Built` one), an ONNX file or a TensorRT
engine. Images are decoded once; each batch goes through the target and through the unreduced
reference, so the comparison is image by image on exactly the same inputs:

- torch targets: the reference is the same model object with the reduction switched off
  (`reduced.reduction_off`, switched back on after each batch): same weights, timm's own forward;
- ONNX / engine targets: the reference is the recipe of the export's sidecar JSON built in torch,
  or no comparison (with a note saying why) when there is no sidecar.

Reported: top-1 and top-5 (images with a label), and against the reference: top-1 agreement with
its Wilson 95 % interval, flips (right->wrong, wrong->right), mean KL(reference || target), the
reference's own top-1. Undecodable images are skipped and counted (their paths listed).
Random weights are refused: accuracy of random weights means nothing.

The JSON form (`EvalResult.to_dict`, `--json`, `--out`), schema_version 1:

    schema_version  1
    kind            "eval"
    target          what was evaluated (artifact dir, model name, .onnx or .engine path)
    backend         "torch" | "onnx" | "engine"
    model, method, schedule, removed_per_layer   the recipe (null when unknown)
    gmacs, gmacs_base                            analytic GMACs per image (null when unknown)
    precision       "fp32", or how an exported graph was converted ("dynamic int8", "fp16")
    data            {root, labels_file, resize, limit, images, evaluated, skipped, skipped_paths}
    top1, top5      fractions over `n_labelled` images (null without labels)
    n_labelled
    reference       description of the unreduced reference, or null
    comparison      metrics.Comparison.to_dict() (n, agreement, agreement_ci95, kl, top1, top5,
                    ref_top1, flips_right_to_wrong, flips_wrong_to_right, n_labelled), or null
    note            why there is no comparison, or other caveats (null when none)
    seconds         wall time of the evaluation loop
    provenance      {versions, machine, date}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from . import data as data_mod
from . import models
from .build import Built, build
from .errors import UserError
from .metrics import Comparison, compare, topk_accuracy
from .provenance import machine, now, versions
from .recipe import Recipe
from .reduced import reduction_off
from .runtime import Runner, engine_runner, ort_runner, predict, torch_runner

__all__ = ["EvalResult", "evaluate", "predict", "reduction_off", "torch_runner", "unreduced_runner"]

SCHEMA_VERSION = 1
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
EXPORTED_FILES = {  # backend -> (what the file is, what was expected), for the one-line errors
    "onnx": ("ONNX file", "an ONNX graph (as `tomectl export ART --onnx FILE` writes)"),
    "engine": ("TensorRT engine", "a serialized TensorRT engine (as `tomectl export ART --trt FILE` writes)"),
}
RANDOM_REFUSAL = (
    "{what} has random weights (made with --random-weights): its accuracy means nothing; "
    "evaluate a model with real weights (--weights FILE or TOMECTL_WEIGHTS_DIR)"
)


@dataclass
class EvalResult:
    target: str
    backend: str
    data: dict
    top1: Optional[float]
    top5: Optional[float]
    n_labelled: int
    comparison: Optional[Comparison]
    reference: Optional[str]
    model: Optional[str] = None
    method: Optional[str] = None
    schedule: Optional[str] = None
    removed_per_layer: Optional[list[int]] = None
    gmacs: Optional[float] = None
    gmacs_base: Optional[float] = None
    note: Optional[str] = None
    precision: str = "fp32"
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)

    @property
    def evaluated(self) -> int:
        return self.data["evaluated"]

    @property
    def skipped(self) -> int:
        return self.data["skipped"]

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "eval",
            "target": self.target,
            "backend": self.backend,
            "model": self.model,
            "method": self.method,
            "schedule": self.schedule,
            "removed_per_layer": self.removed_per_layer,
            "gmacs": self.gmacs,
            "gmacs_base": self.gmacs_base,
            "precision": self.precision,
            "data": self.data,
            "top1": self.top1,
            "top5": self.top5,
            "n_labelled": self.n_labelled,
            "reference": self.reference,
            "comparison": self.comparison.to_dict() if self.comparison else None,
            "note": self.note,
            "seconds": round(self.seconds, 3),
            "provenance": self.provenance,
        }


# --------------------------------------------------------------------------------------------
# Running models on batches


def unreduced_runner(model: torch.nn.Module) -> Runner:
    """Runner for the reduced `model` with its reduction switched off (the unreduced reference)."""
    run = torch_runner(model)

    def run_off(x: torch.Tensor) -> torch.Tensor:
        with reduction_off(model):
            return run(x)

    return run_off


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class _Target:
    name: str
    backend: str
    runner: Runner
    preproc: dict
    reference: Optional[Runner] = None
    reference_desc: Optional[str] = None
    recipe: Optional[Recipe] = None
    built: Optional[Built] = None
    num_classes: Optional[int] = None
    note: Optional[str] = None
    precision: str = "fp32"


def _check_real(weights_info: Optional[dict], what: str) -> None:
    if weights_info and weights_info.get("source") == "random":
        raise UserError(RANDOM_REFUSAL.format(what=what))


def _torch_target(target: Union[Recipe, Built], name: Optional[str], weights,
                  compare_to_unreduced: bool) -> _Target:
    if isinstance(target, Recipe):
        _check_real(target.weights, name or target.model)
        built = build(target, weights=weights)
    else:
        built = target
    _check_real(built.loaded.weights.to_dict(), name or built.recipe.model)
    model = built.model
    ref, desc = None, None
    if compare_to_unreduced:
        ref = unreduced_runner(model)
        desc = f"{built.recipe.model} with the reduction off (same weights, torch)"
    return _Target(
        name=name or built.recipe.model, backend="torch", runner=torch_runner(model),
        preproc=models.preprocessing(model), reference=ref, reference_desc=desc, recipe=built.recipe,
        built=built, num_classes=getattr(model, "num_classes", None),
    )


def sidecar_of(path: str | Path) -> Optional[Path]:
    """The JSON written beside an exported file (``model.onnx`` -> ``model.json``), if any."""
    path = Path(path)
    for cand in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if cand.is_file():
            return cand
    return None


def _read_sidecar(path: Path) -> tuple[Optional[Recipe], dict, Optional[str]]:
    """(recipe or None, the sidecar document, note) for an exported file."""
    from .artifact import read_json
    from .recipe import from_dict

    side = sidecar_of(path)
    if side is None:
        return None, {}, f"no sidecar JSON beside {path.name}: no unreduced reference to compare with"
    doc = read_json(side, "sidecar", f"the JSON object written beside {path.name} by `tomectl export`")
    rec = doc.get("recipe")
    if not isinstance(rec, dict):
        return None, doc, f"sidecar {side.name} has no recipe: no unreduced reference to compare with"
    return from_dict(rec, where=str(side)), doc, None


def _sidecar_weights(doc: dict, recipe: Optional[Recipe]) -> Optional[dict]:
    w = doc.get("weights")
    if isinstance(w, dict):
        return w
    return recipe.weights if recipe is not None else None


def _exported_target(path: Path, backend: str, weights, threads: Optional[int],
                     compare_to_unreduced: bool) -> _Target:
    recipe, doc, note = _read_sidecar(path)
    used_weights = _sidecar_weights(doc, recipe)
    _check_real(used_weights, str(path))
    runner, input_size = ort_runner(path, threads) if backend == "onnx" else engine_runner(path)

    ref, desc, built, num_classes = None, None, None, None
    if recipe is not None:
        from .schedule import Schedule

        # the reference: the sidecar's model with the weights the export used, unreduced, in torch
        plain = Recipe(model=recipe.model, schedule=Schedule.make(r=0), method=recipe.method,
                       weights=used_weights or recipe.weights)
        base = build(plain, weights=weights)
        _check_real(base.loaded.weights.to_dict(), str(path))
        preproc = models.preprocessing(base.model)
        num_classes = getattr(base.model, "num_classes", None)
        if compare_to_unreduced:
            ref, desc = torch_runner(base.model), f"{recipe.model} unreduced (torch, the export's weights)"
        built = build(recipe, random_weights=True)  # only for the analytic GMACs and token counts
    elif isinstance(doc.get("preprocessing"), dict):
        preproc = dict(doc["preprocessing"])
    else:
        preproc = _imagenet_preproc()
        if input_size:
            preproc["input_size"] = input_size
        note = f"{note}; preprocessing: ImageNet defaults"
    if input_size and list(preproc["input_size"]) != list(input_size):
        raise UserError(f"{path} takes input {input_size} but its model expects {preproc['input_size']}")
    conv = doc.get("precision") if isinstance(doc.get("precision"), dict) else {}
    precision = " ".join(str(conv[k]) for k in ("mode", "precision") if conv.get(k)) or "fp32"
    return _Target(name=str(path), backend=backend, runner=runner, preproc=preproc, reference=ref,
                   reference_desc=desc, recipe=recipe, built=built, num_classes=num_classes, note=note,
                   precision=precision)


def _imagenet_preproc() -> dict:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"input_size": [3, 224, 224], "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD), "interpolation": "bicubic", "crop_pct": 0.875,
            "crop_mode": "center"}


def backend_of(target) -> str:
    """'torch', 'onnx' or 'engine' for an evaluation/bench target."""
    if isinstance(target, (Recipe, Built)):
        return "torch"
    suffix = Path(str(target)).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    raise UserError(f"cannot evaluate {target!r}: give a recipe/model, an .onnx file or a TensorRT .engine")


# --------------------------------------------------------------------------------------------


def _run(loader, t: _Target, total: int, threads: Optional[int], progress):
    """Every batch through the target and its reference: (logits, reference logits or None, labels,
    skipped indices, seconds); logits None when nothing decoded."""
    logits, ref_logits, labels, skipped = [], [], [], []
    done = 0
    start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for b in loader:
            skipped.extend(b.skipped)
            if len(b.images):
                logits.append(t.runner(b.images))
                if t.reference is not None:
                    ref_logits.append(t.reference(b.images))
                labels.append(b.labels)
            done += len(b.images) + len(b.skipped)
            if progress is not None:
                progress(done, total)
    finally:
        torch.set_num_threads(prev_threads)
    seconds = time.perf_counter() - start
    if not logits:
        return None, None, None, skipped, seconds
    ref = torch.cat(ref_logits) if ref_logits else None
    return torch.cat(logits), ref, torch.cat(labels), skipped, seconds


def evaluate(
    target: Union[Recipe, Built, str, Path],
    data: str | Path,
    *,
    labels_file: Optional[str | Path] = None,
    resize: str = "timm",
    limit: Optional[int] = None,
    batch_size: int = 64,
    workers: Optional[int] = None,
    compare_to_unreduced: bool = True,
    weights: Optional[str | Path] = None,
    threads: Optional[int] = None,
    name: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> EvalResult:
    """Evaluate `target` on the images under `data` (see the module docstring).

    progress(done, total) is called after each batch, with image counts.
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if resize not in data_mod.RESIZE_MODES:
        raise UserError(f"--resize must be one of {', '.join(data_mod.RESIZE_MODES)}, got {resize!r}")
    samples = data_mod.scan(data, labels_file=labels_file, limit=limit)  # bad data fails before model loading

    kind = backend_of(target)
    if kind == "torch":
        t = _torch_target(target, name, weights, compare_to_unreduced)
    else:
        from .artifact import check_input_file

        what, expected = EXPORTED_FILES[kind]
        path = check_input_file(target, what, expected)
        t = _exported_target(path, kind, weights, threads, compare_to_unreduced)

    if t.num_classes:
        bad = [s for s in samples if s.label >= t.num_classes]
        if bad:
            src = f" (labels file {labels_file})" if labels_file else ""
            raise UserError(
                f"label {bad[0].label} of {bad[0].path}{src} is outside the model's {t.num_classes} classes "
                f"(class indices 0..{t.num_classes - 1}); {len(bad)} of {len(samples)} labels are outside it"
            )

    loader = data_mod.loader(samples, t.preproc, resize=resize, batch_size=batch_size, workers=workers)
    out, ref, y, skipped, seconds = _run(loader, t, len(samples), threads, progress)
    if out is None:
        raise UserError(f"none of the {len(samples)} images under {data} could be decoded")

    comparison = compare(ref, out, y) if ref is not None else None
    lab = y >= 0
    n_lab = int(lab.sum())
    top1 = top5 = None
    if n_lab:
        top1 = topk_accuracy(out[lab], y[lab], 1)
        top5 = topk_accuracy(out[lab], y[lab], min(5, out.shape[-1]))

    rec, built = t.recipe, t.built
    unlabelled = data_mod.unlabelled_note(data, labels_file, samples)
    return EvalResult(
        target=t.name,
        backend=t.backend,
        data={
            "root": str(data), "labels_file": str(labels_file) if labels_file else None, "resize": resize,
            "limit": limit, "images": len(samples), "evaluated": int(out.shape[0]), "skipped": len(skipped),
            "skipped_paths": [samples[i].path for i in sorted(skipped)][:20],
        },
        top1=top1, top5=top5, n_labelled=n_lab, comparison=comparison, reference=t.reference_desc,
        model=rec.model if rec else None, method=rec.method if rec else None,
        schedule=rec.schedule.describe() if rec else None,
        removed_per_layer=list(built.removed) if built else None,
        gmacs=built.macs().gmacs if built else None, gmacs_base=built.base_macs().gmacs if built else None,
        note="; ".join(n for n in (t.note, unlabelled) if n) or None, precision=t.precision, seconds=seconds,
        provenance={"versions": versions(), "machine": machine(), "date": now()},
    )
