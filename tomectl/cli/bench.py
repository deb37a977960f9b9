"""`tomectl bench`: latency, throughput and memory per backend and batch, beside the unreduced model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import bench as lib
from .. import report as report_mod
from ..outputs import check_writable
from . import common


def render(doc: dict) -> None:
    cfg = doc["config"]
    timed = f"{cfg['iters']} iterations" if cfg.get("duration_s") is None else f"{cfg['duration_s']} s"
    rounds = cfg.get("rounds", 1)
    title = f"tomectl bench: {doc['model']} ({cfg['threads']} threads, {timed} x {rounds} round(s))"
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for i, name in enumerate(report_mod.TABLE_COLUMNS):
        t.add_column(name, justify="left" if i < 3 else "right")
    prev = None
    for row, cells in zip(doc["rows"], report_mod.table_rows(doc), strict=True):
        group = (row["backend"], row["batch"])
        if prev is not None and group != prev:
            t.add_section()
        prev = group
        eff = row.get("efficiency")
        if eff is not None:
            cells[-1] = f"[{'green' if eff >= 0.9 else 'yellow' if eff >= 0.7 else 'red'}]{cells[-1]}[/]"
        if row.get("error"):
            cells = [c if not c.startswith("error:") else "[red]error (below)[/]" for c in cells]
        t.add_row(*cells)
    # a pipe or a file has no width: do not squeeze the table into 80 columns there
    console = common.out if common.out.is_terminal else Console(width=200)
    console.print(t)
    for row in doc["rows"]:
        if row.get("error"):
            console.print(f"[red]{row['backend']} batch {row['batch']} {row['label']}:[/] {row['error']}",
                          highlight=False)
    for note in doc.get("notes", []):
        console.print(f"[dim]note: {note}[/]", highlight=False)


def bench(
    target: list[str] = typer.Argument(..., help="timm model name, or artifact directories of one model."),
    r: Optional[str] = typer.Option("0,8,13,16", "--r", help="Constant r values, e.g. 0,8,13,16."),
    method: str = common.Method,
    backend: str = typer.Option("torch", "--backend", help=f"Comma-separated: {', '.join(lib.BACKENDS)}."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, comma-separated."),
    compile_: bool = typer.Option(False, "--compile", help="Also time torch.compile."),
    warmup: int = typer.Option(
        lib.WARMUP_MIN_CALLS, "--warmup",
        help="Untimed calls first, at least (then until --warmup-s have passed and the median settles)."),
    warmup_s: float = typer.Option(
        lib.WARMUP_MIN_S, "--warmup-s",
        help="Warm up for at least this many seconds, until the running median settles (0: exactly --warmup "
        "calls)."),
    warmup_max_s: float = typer.Option(lib.WARMUP_MAX_S, "--warmup-max-s",
                                       help="Stop warming up after this many seconds, settled or not."),
    prime: bool = typer.Option(True, "--prime/--no-prime",
                               help="Run the first configuration of each backend once, untimed, first."),
    iters: int = typer.Option(20, "--iters", help="Timed iterations per process."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds to time instead of --iters."),
    rounds: int = typer.Option(
        lib.DEFAULT_ROUNDS, "--rounds",
        help="Run everything round-robin this many times (pooled; each speedup's rounds give its spread)."),
    precision: str = typer.Option(
        "fp32", "--precision",
        help="Comma-separated fp32,fp16,int8: graphs (ort) and engines (trt) in each; a row per precision, "
        "its speedup against the fp32 unreduced row."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    prop_attn: bool = common.PropAttn,
    formulation: Optional[str] = typer.Option(
        None, "--formulation",
        help="Merge formulation on every backend: scatter or onehot (default: scatter in torch, onehot in "
        "the ONNX/TensorRT graphs, as `tomectl export` writes them)."),
    weights: Optional[Path] = common.Weights,
    random_weights: bool = common.RandomWeights,
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.json/.md/.png here."),
    eval_: list[Path] = typer.Option([], "--eval", help="`tomectl eval --out` JSON(s): accuracy vs GMACs."),
    compare_tome: bool = typer.Option(False, "--compare-tome",
                                      help="Beside each calibrated artifact, its constant-r ToMe twin at the "
                                      "same latency budget (from calibration.json)."),
    json_: bool = common.Json,
) -> None:
    """Time a model at several schedules, backends and batch sizes, each in its own process."""
    if formulation is not None:
        from ..recipe import check_formulation

        check_formulation(formulation, "--formulation")
    rs = common.parse_int_list(r, "--r") or []
    batches = common.parse_int_list(batch, "--batch") or []
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    evals = [lib.load_eval(p) for p in eval_]
    if report is not None:
        check_writable(report, "dir", what="--report", inside=True)
    cols = (TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"))
    with common.progress(*cols, disable=json_) as bar:
        task = bar.add_task("starting", total=None)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        rep = lib.run_bench(target, rs, backends, batches, warmup=warmup, iters=None if duration else iters,
                            duration=duration, threads=threads, warmup_s=warmup_s,
                            warmup_max_s=warmup_max_s, prime=prime, compile=compile_,
                            random_weights=random_weights, weights=weights, method=method,
                            prop_attn=prop_attn, formulation=formulation, rounds=rounds, evals=evals,
                            progress=progress, precisions=[p.strip() for p in precision.split(",") if p],
                            compare_tome=compare_tome)
    doc = rep.to_dict()
    written = report_mod.write(doc, report) if report is not None else None
    if json_:
        common.print_json(doc)
        return
    render(doc)
    if written is not None:
        files = [written.json, written.markdown] + ([written.plot] if written.plot else [])
        common.console.print("wrote " + ", ".join(str(f) for f in files))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
