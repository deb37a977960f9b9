"""Options and rendering helpers shared by the CLI commands."""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass
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


class Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a silent exit 130)."""


def progress(*columns, disable: bool = False, **kwargs):
    """A transient rich progress bar on stderr, drawn only on a terminal: elsewhere rich would draw
    nothing but still print an empty line when it stops (before an `error:` line, say)."""
    from rich.progress import Progress

    return Progress(*columns, console=console, transient=True,
                    disable=disable or not console.is_terminal, **kwargs)


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: [lo, hi], either end open or absent."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def accepts(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self, whole: bool) -> str:
        kind = "a whole number" if whole else "a number"
        lo, hi = (None if x is None else int(x) if x == int(x) else x for x in (self.lo, self.hi))
        if lo is not None and hi is not None:
            text = f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {lo}"
        elif hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {hi}"
        else:
            text = f"a finite {kind[2:]}"
        return text + (f" ({self.note})" if self.note else "")


def _pos(lo: float) -> Range:
    return Range(lo, lo_open=True)


# The accepted range of every numeric option of every command, by flag (one declaration, checked
# before any work by `checked`). A comma-separated list option (--per-layer, bench's --r, --batch)
# has the range of each of its values. tests/test_bad_inputs_cli.py checks that none is missing.
RANGES: dict[str, Range] = {
    # schedules
    "--r": Range(0), "--inflect": Range(-1, 1), "--per-layer": Range(0), "--keep": Range(0, 1, lo_open=True),
    # data and processes
    "--threads": Range(1), "--workers": Range(0), "--batch": Range(1), "--batch-size": Range(1),
    "--limit": Range(1), "--val-limit": Range(1), "--seed": Range(0, 2**32 - 1),
    # bench
    "--warmup": Range(0), "--iters": Range(1), "--duration": _pos(0), "--rounds": Range(1),
    "--warmup-s": Range(0, note="0: exactly --warmup calls"), "--warmup-max-s": Range(0),
    # calibrate
    "--flops": _pos(0), "--gmacs": _pos(0), "--latency-ms": _pos(0), "--speedup": _pos(0),
    "--n-images": Range(8), "--search-evals": Range(0, note="0: no per-layer search"),
    # export
    "--check-images": Range(1), "--workspace-gb": _pos(0), "--min-agreement": Range(0, 1),
    "--max-agreement-drop": Range(0, 1),
    # train
    "--epochs": Range(1), "--lr": _pos(0), "--min-lr": Range(0), "--weight-decay": Range(0),
    "--warmup-epochs": Range(0), "--clip-grad": Range(0, note="0 turns clipping off"),
    "--feature-weight": Range(0), "--ce-weight": Range(0),
}


def check_range(flag: str, value) -> None:
    """Refuse a value of `flag` outside its declared range (None and undeclared flags pass)."""
    rng = RANGES.get(flag)
    if rng is None or value is None or isinstance(value, bool):
        return
    if isinstance(value, str):  # a comma-separated list of whole numbers
        values = parse_int_list(value, flag) or []
        bad = [v for v in values if not rng.accepts(v)]
        if bad:
            raise UserError(f"{flag} values must each be {rng.describe(True)}, got {value!r}")
        return
    if isinstance(value, (int, float)) and not rng.accepts(value):
        raise UserError(f"{flag} must be {rng.describe(isinstance(value, int))}, got {value!r}")


def option_flag(default) -> Optional[str]:
    """The long flag of a typer.Option default (None for arguments)."""
    decls = [d for d in getattr(default, "param_decls", None) or () if d.startswith("--")]
    return decls[0] if decls else None


def checked(command):
    """Wrap a command: its numeric options are range-checked before it runs, and Ctrl-C inside it
    becomes `Interrupted` (typer would turn it into a silent exit 130)."""
    flags = {name: option_flag(p.default) for name, p in inspect.signature(command).parameters.items()}

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            for name, value in kwargs.items():
                if flags.get(name):
                    check_range(flags[name], value)
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted() from None

    return wrapper


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
