"""`tomectl visualize`: which patches each final token holds, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import visualize as lib
from ..outputs import check_writable
from . import common


def visualize(
    model: Optional[str] = typer.Argument(None, help="timm model name or artifact directory."),
    image: Path = typer.Argument(..., help="Image file to run the model on."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write (replaced if present)."),
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
    resize: str = typer.Option("timm", "--resize",
                               help="timm (resize + centre crop) or squash (straight resize)."),
    json_: bool = common.Json,
) -> None:
    """Draw each final token's patch group over the image (outlines) and as mean colours."""
    rec = common.resolve_target(model, recipe, method, r, inflect, per_layer, keep, prop_attn, formulation)
    check_writable(out, "file", what="--out")
    with common.console.status(f"running {rec.model} ({rec.method}) on {image}..."):
        res = lib.visualize(rec, image, out, weights=weights, random_weights=random_weights, resize=resize)
    if json_:
        common.print_json(res.to_dict())
        return
    t = Table(title="tomectl visualize", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{res.model}, {res.method} {res.schedule}")
    t.add_row("tokens per layer", " ".join(map(str, res.tokens_per_layer)))
    t.add_row("final tokens", f"{res.final_tokens} for {res.grid[0] * res.grid[1]} patches "
              f"(largest holds {res.largest_group}, {res.patches_dropped} dropped)")
    t.add_row("written", res.out)
    common.out.print(t)


def register(app: typer.Typer) -> None:
    app.command()(visualize)
