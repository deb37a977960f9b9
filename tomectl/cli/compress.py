"""`tomectl compress` and `tomectl inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import compress as lib
from ..artifact import RECIPE
from ..outputs import check_writable
from . import common


def render(rep: lib.ModelReport, title: str) -> None:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{rep.model} ({rep.family})")
    t.add_row("method", f"{rep.method}, {rep.schedule}")
    t.add_row("params", f"{rep.params / 1e6:.2f} M")
    t.add_row("GMACs", f"{rep.gmacs_base:.3f} -> {rep.gmacs:.3f}  ({rep.ratio:.1%} of unreduced)")
    if rep.gmacs_measured is not None:
        t.add_row("GMACs measured", f"{rep.gmacs_measured:.3f} (torch FlopCounterMode)")
    t.add_row("tokens per layer", " ".join(map(str, rep.tokens_per_layer)))
    t.add_row("removed per layer", " ".join(map(str, rep.removed_per_layer)))
    if rep.weights:
        w = rep.weights
        t.add_row("weights", f"{w.get('source')} {w.get('path') or ''}".strip())
    if rep.out:
        t.add_row("artifact", rep.out)
    common.out.print(t)


def compress(
    model: Optional[str] = typer.Argument(None, help="timm model name (e.g. deit_small_patch16_224)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe instead of MODEL + flags."),
    method: str = common.Method,
    r: Optional[int] = common.R,
    inflect: Optional[float] = common.Inflect,
    per_layer: Optional[str] = common.PerLayer,
    keep: Optional[float] = common.Keep,
    prop_attn: bool = common.PropAttn,
    formulation: str = common.Formulation,
    weights: Optional[Path] = common.Weights,
    random_weights: bool = common.RandomWeights,
    force: bool = common.Force,
    json_: bool = common.Json,
) -> None:
    """Apply a reduction schedule to a model and write an artifact directory (recipe.yaml, summary.json)."""
    rec = common.resolve_target(model, recipe, method, r, inflect, per_layer, keep, prop_attn, formulation)
    check_writable(out, "dir", force=force, what="--out", marker=RECIPE)
    with common.console.status(f"compressing {rec.model}..."):
        rep = lib.compress(rec, out, weights=weights, random_weights=random_weights, force=force)
    if json_:
        common.print_json(rep.to_dict())
    else:
        render(rep, "tomectl compress")


def inspect(
    model: Optional[str] = typer.Argument(None, help="timm model name or artifact directory."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe instead of MODEL + flags."),
    method: str = common.Method,
    r: Optional[int] = common.R,
    inflect: Optional[float] = common.Inflect,
    per_layer: Optional[str] = common.PerLayer,
    keep: Optional[float] = common.Keep,
    prop_attn: bool = common.PropAttn,
    formulation: str = common.Formulation,
    json_: bool = common.Json,
) -> None:
    """Show a model's family, tokens per layer, params and GMACs under a schedule (no weights needed)."""
    rec = common.resolve_target(model, recipe, method, r, inflect, per_layer, keep, prop_attn, formulation)
    rep = lib.inspect(rec)
    rep.weights = {}
    if json_:
        common.print_json(rep.to_dict())
    else:
        render(rep, "tomectl inspect")


def register(app: typer.Typer) -> None:
    app.command()(compress)
    app.command()(inspect)
