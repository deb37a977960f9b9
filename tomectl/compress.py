"""`tomectl compress` and `tomectl inspect` as library functions returning plain results."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import __version__
from .adapters import adapter_for
from .artifact import LEARNED, RECIPE, SUMMARY, atomic_dir, recipe_document, write_json, write_yaml
from .build import Built, build
from .flops import measured_macs
from .models import check_name, preprocessing, sha256_of
from .provenance import machine, now, versions
from .recipe import Recipe


@dataclass
class ModelReport:
    model: str
    family: str
    method: str
    schedule: str
    removed_per_layer: list[int]
    tokens_per_layer: list[int]
    params: int
    gmacs_base: float
    gmacs: float
    gmacs_measured: Optional[float] = None
    weights: dict = field(default_factory=dict)
    out: Optional[str] = None

    @property
    def ratio(self) -> float:
        return self.gmacs / self.gmacs_base

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["gmacs_ratio"] = round(self.ratio, 4)
        return d


def report(built: Built, measure: bool = True) -> ModelReport:
    model = built.model
    recipe = built.recipe
    measured = None
    if measure:
        measured = measured_macs(model, preprocessing(model)["input_size"]) / 1e9
    return ModelReport(
        model=recipe.model,
        family=check_name(recipe.model),
        method=recipe.method,
        schedule=recipe.schedule.describe(),
        removed_per_layer=built.removed,
        tokens_per_layer=built.tokens,
        params=sum(p.numel() for p in model.parameters()),
        gmacs_base=built.base_macs().gmacs,
        gmacs=built.macs().gmacs,
        gmacs_measured=measured,
        weights=built.loaded.weights.to_dict(),
    )


def inspect(recipe: Recipe, weights=None, random_weights: bool = True) -> ModelReport:
    """Describe a model under a schedule; random weights by default (no weights are needed)."""
    return report(build(recipe, weights=weights, random_weights=random_weights), measure=False)


def compress(recipe: Recipe, out: str | Path, weights=None, random_weights: bool = False,
             force: bool = False, extra: Optional[Callable[[Path, Built], None]] = None) -> ModelReport:
    """Build the reduced model, measure it, and write the artifact directory atomically.

    `extra(tmp_dir, built)` may add files (calibrate's reports) before the directory is renamed into place.
    """
    with atomic_dir(out, force=force) as tmp:
        built = build(recipe, weights=weights, random_weights=random_weights)
        rep = report(built, measure=True)
        learned = None
        if recipe.learned:  # the trained parameters travel with the artifact
            def learned(path: Path) -> None:
                shutil.copyfile(recipe.learned["path"], path)
        write_artifact(tmp, built, recipe, rep, learned=learned)
        if extra is not None:
            extra(tmp, built)
    rep.out = str(out)
    return rep


def write_artifact(tmp: Path, built: Built, recipe: Recipe, rep: ModelReport, *,
                   weights: Optional[dict] = None, learned: Optional[Callable[[Path], None]] = None,
                   **summary_extra) -> None:
    """recipe.yaml and summary.json of `built` into `tmp`, an artifact directory being written (what
    `compress` and `train` share). `weights` replaces the weights `rep` records; `learned(path)`
    writes the learned parameters, which recipe.yaml then names; `summary_extra` goes into summary.json."""
    weights = rep.weights if weights is None else weights
    doc = recipe_document(recipe, built.removed, built.tokens, weights, __version__)
    if learned is not None:
        learned(tmp / LEARNED)
        doc["learned"] = {"path": LEARNED, "sha256": sha256_of(tmp / LEARNED)}
    write_yaml(tmp / RECIPE, doc)
    summary = rep.to_dict()
    summary.pop("out", None)
    summary.update(
        weights=weights,
        protected_tokens=adapter_for(built.model).protected_tokens(built.model),
        options=recipe.options,
        preprocessing=preprocessing(built.model),
        versions=versions(),
        machine=machine(),
        created=now(),
        **summary_extra,
    )
    write_json(tmp / SUMMARY, summary)
