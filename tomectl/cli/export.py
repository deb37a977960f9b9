"""`tomectl export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..outputs import check_writable
from . import common


def render(rep) -> None:
    t = Table(title="tomectl export", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{rep.model}, {rep.method} {rep.schedule}")
    t.add_row(
        "GMACs", f"{rep.gmacs_base:.3f} -> {rep.gmacs:.3f}  ({rep.gmacs / rep.gmacs_base:.1%} of unreduced)"
    )
    t.add_row("tokens per layer", " ".join(map(str, rep.tokens_per_layer)))
    t.add_row("merge formulation", f"{rep.formulation} ({rep.formulation_reason})")
    o = rep.onnx
    if o is not None:
        nodes = f"{o.nodes} nodes"
        if o.nodes_simplified is not None:
            nodes += f" -> {o.nodes_simplified} after onnxslim" + (
                "" if o.simplified else " (not kept, see note)"
            )
        if o.path:
            t.add_row("ONNX", f"{o.path}  (+ {Path(o.sidecar).name})")
        t.add_row("graph", f"opset {o.opset}, input {o.input_name} {o.input_shape}, {nodes}")
        t.add_row(
            "parity vs PyTorch",
            f"max |diff| {o.max_abs_diff:.2e}, top-1 agreement {o.top1_agreement:.0%} on {o.check_source}"
            + (" (the fp32 graph)" if o.precision != "fp32" else ""),
        )
        if o.precision_check:
            c = o.precision_check
            t.add_row(o.precision, f"{o.conversion.get('mode', '')} {o.precision}".strip())
            t.add_row("vs unreduced fp32",
                      f"agreement {c['agreement']:.1%} (fp32 graph {c['agreement_fp32']:.1%}, "
                      f"{c['difference'] * 100:+.1f} points, 95 % [{c['difference_ci95'][0] * 100:+.1f}, "
                      f"{c['difference_ci95'][1] * 100:+.1f}]) on {c['n']} images")
    e = rep.engine
    if e is not None:
        t.add_row("engine", f"{e.path}  (+ {Path(e.metadata).name})")
        t.add_row(
            "TensorRT", f"{e.tensorrt_version} on {e.gpu}, {e.precision}, built in {e.build_seconds:.0f} s"
        )
        floor = f" (floor {e.min_agreement:.0%})" if e.min_agreement else ""
        t.add_row(
            "engine vs onnxruntime",
            f"top-1 agreement {e.top1_agreement:.1%}{floor}, "
            f"max |diff| {e.max_abs_diff:.3g} on {e.n_check} images",
        )
        if e.precision_check:
            c = e.precision_check
            t.add_row("vs unreduced fp32",
                      f"agreement {c['agreement']:.1%} (fp32 graph {c['agreement_fp32']:.1%}, "
                      f"{c['difference'] * 100:+.1f} points, 95 % [{c['difference_ci95'][0] * 100:+.1f}, "
                      f"{c['difference_ci95'][1] * 100:+.1f}]) on {c['n']} images")
    common.out.print(t)
    for note in (o.notes if o else []) + (e.notes if e else []):
        common.console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


def export(
    target: Optional[str] = typer.Argument(
        None, help="Artifact directory, or a timm model name with schedule flags."
    ),
    onnx_out: Optional[Path] = typer.Option(None, "--onnx", help="ONNX file to write (+ FILE.json sidecar)."),
    trt_out: Optional[Path] = typer.Option(
        None, "--trt", help="TensorRT engine to write (+ FILE.json metadata)."
    ),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe instead of TARGET + flags."),
    batch: int = typer.Option(1, "--batch", help="Fixed batch size of the graph/engine."),
    precision: Optional[str] = typer.Option(
        None, "--precision",
        help="fp32, fp16 or int8: of the ONNX graph (validated against the unreduced model) or the engine "
        "(default: the precision the artifact was calibrated for, else fp32)."),
    int8_mode: Optional[str] = typer.Option(
        None, "--int8-mode",
        help="ONNX int8: dynamic (default: no calibration; fastest on CPU) or static (QDQ, calibrated)."),
    calib_method: Optional[str] = typer.Option(
        None, "--calib-method", help="Static int8 calibration: entropy (default), percentile or minmax."),
    max_agreement_drop: Optional[float] = typer.Option(
        None, "--max-agreement-drop",
        help="fp16/int8 ONNX: refuse the graph when its agreement with the unreduced model is shown (95 %) "
        "to fall more than this (0-1) below the fp32 graph's (default 0.01 fp16, 0.02 int8)."),
    formulation: Optional[str] = typer.Option(
        None,
        "--formulation",
        help="Merge formulation in the graph: scatter or onehot (default onehot: TensorRT parses it "
        "without plugins, and it measured as fast as scatter in ONNX Runtime).",
    ),
    calib_images: Optional[Path] = typer.Option(
        None,
        "--calib-images",
        help="Images for the parity checks, int8 calibration and the fp16/int8 validation (default: shared "
        "images; calibration and validation use disjoint ones).",
    ),
    check_images: Optional[int] = typer.Option(
        None, "--check-images",
        help="How many images to check on (default 16; 64 with --trt; 256 for fp16/int8 ONNX validation)."
    ),
    simplify: bool = typer.Option(
        True, "--simplify/--no-simplify", help="Simplify with onnxslim where parity holds."
    ),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", help="TensorRT timing cache file to reuse."
    ),
    workspace_gb: Optional[float] = typer.Option(
        None, "--workspace-gb", help="TensorRT builder workspace (GB)."
    ),
    min_agreement: Optional[float] = typer.Option(
        None, "--min-agreement",
        help="Engine top-1 agreement floor vs the fp32 onnxruntime graph (default 0.99 for fp32 engines; "
        "fp16/int8 engines are judged against the unreduced model, see --max-agreement-drop)."
    ),
    method: str = common.Method,
    r: Optional[int] = common.R,
    inflect: Optional[float] = common.Inflect,
    per_layer: Optional[str] = common.PerLayer,
    keep: Optional[float] = common.Keep,
    prop_attn: bool = common.PropAttn,
    weights: Optional[Path] = common.Weights,
    random_weights: bool = common.RandomWeights,
    force: bool = common.Force,
    json_: bool = common.Json,
) -> None:
    """Export a reduced model to a checked static-shape ONNX graph and/or a validated TensorRT engine."""
    from .. import export as lib

    rec = common.resolve_target(
        target, recipe, method, r, inflect, per_layer, keep, prop_attn, formulation or "scatter"
    )
    for flag, path in (("--onnx", onnx_out), ("--trt", trt_out)):
        if path is not None:  # the file and its JSON sidecar, before the minutes of export
            check_writable(path, "file", force=force, what=flag)
            check_writable(path.with_name(path.name + ".json"), "file", force=force, what=f"{flag} sidecar")
    if trt_out is not None and timing_cache is not None:
        check_writable(timing_cache, "file", what="--timing-cache")
    with common.console.status("exporting...") as status:
        rep = lib.export(
            rec,
            onnx_out=onnx_out,
            trt_out=trt_out,
            batch=batch,
            precision=precision,
            formulation=formulation,
            calib_images=calib_images,
            check_images=check_images,
            simplify=simplify,
            weights=weights,
            random_weights=random_weights,
            timing_cache=timing_cache,
            workspace_gb=workspace_gb,
            min_agreement=min_agreement,
            force=force,
            progress=lambda msg: status.update(msg),
            int8_mode=int8_mode,
            calib_method=calib_method,
            max_agreement_drop=max_agreement_drop,
        )
    if json_:
        common.print_json(rep.to_dict())
    else:
        render(rep)


def register(app: typer.Typer) -> None:
    app.command()(export)
