"""`tomectl calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import calibrate as lib
from ..artifact import RECIPE
from ..compress import compress
from ..outputs import check_writable
from . import common


def _render(res: lib.CalibrationResult, out: Path) -> None:
    t = Table(title=f"tomectl calibrate: {res.model}, {res.budget.describe()}", title_justify="left")
    for col in ("", "method", "schedule", "precision", "GMACs", "predicted ms", "latency ms", "images",
                "agreement", "KL"):
        t.add_column(col, justify="left" if col in ("", "method", "schedule") else "right")
    ranked = sorted(res.candidates,
                    key=lambda c: (not c.chosen, -c.n_scored, c.kl if c.kl is not None else 9e9))
    for c in ranked[:12]:
        t.add_row("*" if c.chosen else ("twin" if c.tome_twin else ""), c.method, c.family, c.precision,
                  f"{c.gmacs:.3f}", "" if c.predicted_ms is None else f"{c.predicted_ms:.2f}",
                  "" if c.latency_ms is None else f"{c.latency_ms:.2f}", str(c.n_scored or ""),
                  "" if c.agreement is None else f"{c.agreement:.1%}", "" if c.kl is None else f"{c.kl:.4f}")
    common.out.print(t)
    c = res.chosen
    common.out.print(
        f"chosen: {c.method} {c.family}" + (f" {c.precision}" if c.precision != "fp32" else "")
        + f", removed per layer {' '.join(map(str, c.removed))}; "
        f"{c.gmacs:.3f} of {res.base_gmacs:.3f} GMACs ({c.gmacs / res.base_gmacs:.1%})"
        + (f", {c.latency_ms:.2f} ms (spread {c.latency_spread:.1%})" if c.latency_ms else "")
        + (f", {c.measured_speedup:.2f}x the unreduced model timed beside it" if c.measured_speedup else "")
        + f"; {len(res.candidates)} candidates in {res.seconds:.0f} s"
    )
    for n in res.notes:
        common.out.print(f"note: {n}")
    common.out.print(f"wrote {out} (recipe.yaml, summary.json, calibration.json/.md, frontier.png)")


def _with_progress(run: Callable[[lib.ProgressFn], lib.CalibrationResult]) -> lib.CalibrationResult:
    """`run(progress)` under a progress bar per phase (reference, candidates, search, latency)."""
    with common.progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn()) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        return run(progress)


def calibrate(
    model: str = typer.Argument(..., help="timm model name."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    flops: Optional[float] = typer.Option(None, "--flops",
                                          help="Budget: fraction of the unreduced GMACs (e.g. 0.6)."),
    gmacs: Optional[float] = typer.Option(None, "--gmacs", help="Budget: GMACs per image."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="Budget: latency per batch in ms."),
    speedup: Optional[float] = typer.Option(None, "--speedup",
                                            help="Budget: speedup over the unreduced model."),
    backend: str = typer.Option("torch", "--backend", help="Latency budgets: torch, ort or trt."),
    batch: int = typer.Option(1, "--batch", help="Latency budgets: batch size."),
    precision: Optional[str] = typer.Option(None, "--precision",
                                            help="Latency budgets: the precision(s) of the graph timed, "
                                            "comma-separated to search them with the schedule (fp32,int8 "
                                            "on ort; fp16 or int8 engines on trt); the chosen one is "
                                            "recorded in the artifact for export. Default: fp32,int8 on "
                                            "ort with --images (int8 graphs are validated on them), fp32 "
                                            "otherwise."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                             help="Where the latency model of the target is cached "
                                             "(default $TOMECTL_CACHE_DIR/latency or "
                                             "~/.cache/tomectl/latency)."),
    refresh: bool = typer.Option(False, "--refresh-latency-model",
                                 help="Measure the target's latency model again even if cached."),
    images: Optional[Path] = typer.Option(None, "--images", help="Calibration images (unlabelled is fine)."),
    n_images: int = typer.Option(lib.DEFAULT_IMAGES, "--n-images", help="How many calibration images."),
    resize: str = typer.Option("timm", "--resize", help="timm (resize + centre crop) or squash."),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help="Restrict to these methods (comma-separated)."),
    search_evals: int = typer.Option(10, "--search-evals", help="Per-layer search evaluations."),
    seed: int = typer.Option(0, "--seed", help="Search seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for latency measurements."),
    weights: Optional[Path] = common.Weights,
    random_weights: bool = common.RandomWeights,
    force: bool = common.Force,
    json_: bool = common.Json,
) -> None:
    """Find the schedule that meets a FLOPs or latency budget with the least accuracy loss."""
    budget = lib.Budget.parse(flops, gmacs, latency_ms, speedup, backend, batch, precision or "fp32")
    if precision is None:
        budget = lib.default_precision(budget, images is not None)
    if budget.backend == "trt":
        from ..bench import check_backends

        check_backends(["trt"])  # one clear line without TensorRT or an NVIDIA GPU
    check_writable(out, "dir", force=force, what="--out", marker=RECIPE)
    methods = [m.strip() for m in method.split(",")] if method else None
    res = _with_progress(lambda progress: lib.calibrate(
        model, budget, images=images, n_images=n_images, resize=resize, methods=methods, weights=weights,
        random_weights=random_weights, search_evals=search_evals, seed=seed, threads=threads,
        progress=progress, cache_dir=cache_dir, refresh_latency_model=refresh))
    recipe = lib.chosen_recipe(res, weights=weights, random_weights=random_weights)
    res.out = str(out)

    def extra(tmp: Path, built) -> None:
        lib.write_reports(res, tmp, built.tokens[0])

    compress(recipe, out, weights=weights, random_weights=random_weights, force=force, extra=extra)
    if json_:
        common.print_json(res.to_dict())
    else:
        _render(res, out)


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
