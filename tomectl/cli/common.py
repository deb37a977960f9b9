"""Options and rendering helpers shared by the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import UserError

console = Console(stderr=True)  # humans read stderr; stdout carries --json
out = Console()


def error(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def print_json(doc) -> None:
    print(json.dumps(doc, indent=2, default=str))


def parse_int_list(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{name} must be comma-separated whole numbers, got {text!r}") from None


# Shared option declarations (Typer reads the defaults as option specs).
Method = typer.Option("tome", "--method", "-m", help="Reduction method.")
R = typer.Option(None, "--r", "--remove",
                 help="Tokens removed per layer (constant schedule, or the ramp's centre with --inflect). "
                      "--remove is the same flag, for torchrun, whose parser takes --r for its own options.")
Inflect = typer.Option(None, "--inflect",
                       help="Linear ramp around r: first layer r*(1-inflect), last r*(1+inflect).")
PerLayer = typer.Option(None, "--per-layer", help="Explicit per-layer removals, comma-separated.")
Keep = typer.Option(None, "--keep", help="Fraction of unprotected tokens left after the last layer.")
PropAttn = typer.Option(True, "--prop-attn/--no-prop-attn", help="Proportional attention (log-size bias).")
Formulation = typer.Option("scatter", "--formulation", help="Merge formulation: scatter or onehot.")
Weights = typer.Option(None, "--weights", help="Weights file (.safetensors or .pth), loaded strictly.")
RandomWeights = typer.Option(False, "--random-weights", help="Random weights: for speed work only.")
Json = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
Force = typer.Option(False, "--force", help="Replace an existing output.")


def schedule_given(r, inflect, per_layer, keep) -> bool:
    return any(v is not None for v in (r, inflect, per_layer, keep))


def recipe_from_flags(model: str, method: str, r, inflect, per_layer, keep, prop_attn, formulation):
    from ..recipe import Recipe, check_formulation, check_method
    from ..schedule import Schedule

    check_method(method, "--method")
    check_formulation(formulation, "--formulation")
    if not schedule_given(r, inflect, per_layer, keep):
        r = 0
    schedule = Schedule.make(r=r, inflect=inflect, per_layer=parse_int_list(per_layer, "--per-layer"),
                             keep=keep, where="schedule flags")
    return Recipe(model=model, schedule=schedule, method=method, prop_attn=prop_attn, formulation=formulation)


def resolve_target(target: Optional[str], recipe_file: Optional[Path], method, r, inflect, per_layer, keep,
                   prop_attn, formulation):
    """MODEL name, artifact directory or --recipe FILE -> a Recipe (flags only with a model name)."""
    from ..artifact import is_artifact, read
    from ..recipe import load as load_recipe

    flags = schedule_given(r, inflect, per_layer, keep)
    if recipe_file is not None:
        if target is not None or flags:
            raise UserError("give either --recipe FILE or a model with schedule flags, not both")
        return load_recipe(recipe_file)
    if target is None:
        raise UserError("name a model (e.g. deit_small_patch16_224), an artifact directory, or --recipe FILE")
    if is_artifact(target):
        if flags:
            raise UserError(f"{target} is an artifact with its own schedule; drop the schedule flags")
        return read(target)[0]
    if Path(target).exists() and Path(target).is_dir():
        raise UserError(f"{target} is a directory but not an artifact (no recipe.yaml)")
    return recipe_from_flags(target, method, r, inflect, per_layer, keep, prop_attn, formulation)
