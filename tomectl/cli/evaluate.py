"""`tomectl eval`: top-1/top-5 and agreement with the unreduced model on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .. import evaluate as lib
from ..artifact import atomic_file, write_json
from ..errors import UserError
from ..outputs import check_writable
from . import common


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2%}"


def render(res: lib.EvalResult) -> None:
    t = Table(title="tomectl eval", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("target", f"{res.target} ({res.backend}" + (f", {res.precision})" if res.precision != "fp32"
                                                          else ")"))
    if res.model:
        t.add_row("model", f"{res.model}, {res.method} {res.schedule}")
    if res.gmacs is not None:
        ratio = res.gmacs / res.gmacs_base
        t.add_row("GMACs", f"{res.gmacs_base:.3f} -> {res.gmacs:.3f} ({ratio:.1%})")
    d = res.data
    t.add_row("images", f"{d['evaluated']} evaluated, {d['skipped']} skipped (undecodable), "
                        f"resize {d['resize']}")
    if res.top1 is not None:
        t.add_row("top-1 / top-5", f"{_pct(res.top1)} / {_pct(res.top5)}  ({res.n_labelled} labelled)")
    c = res.comparison
    if c is not None:
        lo, hi = c.agreement_ci95
        t.add_row("vs unreduced", res.reference or "")
        if c.ref_top1 is not None:
            t.add_row("  unreduced top-1", _pct(c.ref_top1))
        t.add_row("  agreement", f"{c.agreement:.2%}  (95% CI {lo:.2%} - {hi:.2%}, n={c.n})")
        if c.flips_right_to_wrong is not None:
            t.add_row("  flips", f"{c.flips_right_to_wrong} right->wrong, "
                                 f"{c.flips_wrong_to_right} wrong->right")
        t.add_row("  mean KL", f"{c.kl:.4f} nats")
    if res.note:
        t.add_row("note", res.note)
    t.add_row("time", f"{res.seconds:.1f} s")
    common.out.print(t)


def eval_(
    target: Optional[str] = typer.Argument(None, help="Model name, artifact dir, .onnx file or .engine."),
    data: Path = typer.Option(..., "--data", help="ImageFolder tree (wnid folders) or a folder of images."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="'path label' lines (index or wnid)."),
    resize: str = typer.Option("timm", "--resize", help="timm (resize + centre crop) or squash (resize)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate N images spread over the set."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the model."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe instead of MODEL + flags."),
    method: str = common.Method,
    r: Optional[int] = common.R,
    inflect: Optional[float] = common.Inflect,
    per_layer: Optional[str] = common.PerLayer,
    keep: Optional[float] = common.Keep,
    prop_attn: bool = common.PropAttn,
    formulation: str = common.Formulation,
    weights: Optional[Path] = common.Weights,
    no_compare: bool = typer.Option(False, "--no-compare", help="No unreduced reference (half the work)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON to this file."),
    json_: bool = common.Json,
) -> None:
    """Evaluate a model, artifact, ONNX file or engine: top-1/5, and agreement, flips, KL vs unreduced."""
    if target is not None and Path(target).suffix.lower() in lib.ONNX_SUFFIXES + lib.ENGINE_SUFFIXES:
        if recipe is not None or common.schedule_given(r, inflect, per_layer, keep):
            raise UserError(f"{target} is an exported model with its own schedule; drop the schedule flags")
        tgt = target
    else:
        tgt = common.resolve_target(target, recipe, method, r, inflect, per_layer, keep, prop_attn,
                                    formulation)
    if out is not None:
        check_writable(out, "file", what="--out")
    cols = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
            TimeElapsedColumn(), TimeRemainingColumn())
    with common.progress(*cols, disable=json_) as bar:
        task = bar.add_task("eval", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        res = lib.evaluate(tgt, data, labels_file=labels, resize=resize, limit=limit, batch_size=batch_size,
                           workers=workers, compare_to_unreduced=not no_compare, weights=weights,
                           threads=threads, name=target, progress=progress)
    doc = res.to_dict()
    if out is not None:
        with atomic_file(out) as tmp:
            write_json(tmp, doc)
    if json_:
        common.print_json(doc)
    else:
        render(res)
        if out is not None:
            common.console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
