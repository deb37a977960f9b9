"""`tomectl train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .. import data
from .. import train as lib
from ..artifact import RECIPE, is_artifact
from ..outputs import check_writable
from . import common


def _render(res: lib.TrainResult) -> None:
    t = Table(title=f"tomectl train: {res.recipe['model']}, {res.recipe['method']}", title_justify="left")
    val = any(e.agreement is not None for e in res.epochs)
    ce = any(e.ce is not None for e in res.epochs)
    aux = any(e.aux for e in res.epochs)
    cols = ["epoch", "loss", "KL"] + (["aux"] if aux else []) + (["CE"] if ce else []) + ["lr", "img/s"] \
        + (["val agree", "val KL"] if val else [])
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for e in res.epochs:
        row = [str(e.epoch), f"{e.loss:.4f}", f"{e.kl:.4f}"] + ([f"{e.aux:.4f}"] if aux else []) \
            + (["" if e.ce is None else f"{e.ce:.3f}"] if ce else []) + [f"{e.lr:.1e}", f"{e.img_per_s:.1f}"]
        if val:
            row += ["" if e.agreement is None else f"{e.agreement:.1%}",
                    "" if e.kl_val is None else f"{e.kl_val:.4f}"]
        t.add_row(*row)
    common.out.print(t)
    common.out.print(
        f"{res.images} images{' (labelled: CE on)' if res.labelled and res.config['ce_weight'] > 0 else ''}, "
        f"{res.trainable_params:,} trainable parameters, {res.world_size} process(es) on {res.device}, "
        f"{res.seconds:.0f} s; {res.gmacs:.3f} of {res.gmacs_base:.3f} GMACs "
        f"({res.gmacs / res.gmacs_base:.1%})"
    )
    for note in res.notes:
        common.out.print(f"note: {note}", highlight=False, soft_wrap=True)
    common.out.print(f"wrote {res.out} (recipe.yaml, learned.safetensors, summary.json, train.json)")


COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
           TimeRemainingColumn())


def _reporter(bar: Progress, epochs: int):
    """The progress callback of `lib.train`: a bar over the steps, one line per epoch."""
    task = None

    def progress(event: str, info: dict) -> None:
        nonlocal task
        if event == "start":
            task = bar.add_task("training", total=info["total_steps"], completed=info["done"])
        elif event == "step":
            bar.update(task, advance=1, description=(
                f"epoch {info['epoch'] + 1}/{epochs} loss {info['loss']:.4f} "
                f"{info['img_per_s']:.1f} img/s"))
        elif event == "val":
            bar.update(task, description=f"epoch {info['epoch']}/{epochs}: measuring agreement on --val")
        elif event == "epoch":
            agree = "" if info["agreement"] is None else f", val agreement {info['agreement']:.1%}"
            common.console.print(f"epoch {info['epoch']}/{epochs}: loss {info['loss']:.4f} "
                                 f"(KL {info['kl']:.4f}){agree}, {info['seconds']:.0f} s")

    return progress


def train(
    model: Optional[str] = typer.Argument(None, help="timm model name (or --recipe FILE)."),
    images: Path = typer.Option(..., "--images", help="Training images: any folder (labels optional)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe instead of MODEL + flags."),
    method: str = typer.Option("dtem", "--method", "-m", help="Learned method: dtem, patchmerger or ltm."),
    r: Optional[int] = common.R,
    inflect: Optional[float] = common.Inflect,
    per_layer: Optional[str] = common.PerLayer,
    keep: Optional[float] = common.Keep,
    prop_attn: bool = common.PropAttn,
    formulation: str = common.Formulation,
    epochs: int = typer.Option(10, "--epochs", help="Passes over the images."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step (per process)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, cosine schedule)."),
    min_lr: float = typer.Option(1e-5, "--min-lr", help="Final learning rate."),
    weight_decay: float = typer.Option(0.05, "--weight-decay",
                                       help="AdamW weight decay (not on biases/norms)."),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="Linear warm-up length."),
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Gradient norm clip (0: off)."),
    feature_weight: float = typer.Option(0.0, "--feature-weight",
                                         help="Weight of pre-logits feature distillation."),
    ce_weight: float = typer.Option(0.5, "--ce-weight",
                                    help="Weight of cross-entropy where images have labels."),
    augment: str = typer.Option("timm", "--augment", help="timm (training augmentation) or none."),
    finetune: bool = typer.Option(False, "--finetune", help="Unfreeze the backbone (end-to-end)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only this many training images."),
    val: Optional[Path] = typer.Option(None, "--val",
                                       help="Images to measure agreement on after each epoch."),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", help="Use only this many val images."),
    val_resize: str = typer.Option("timm", "--val-resize", help="Val preprocessing: timm or squash."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes."),
    seed: int = typer.Option(0, "--seed", help="Seed (order of images, initialisation)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.ckpt."),
    weights: Optional[Path] = common.Weights,
    random_weights: bool = common.RandomWeights,
    force: bool = common.Force,
    json_: bool = common.Json,
) -> None:
    """Train a learned merging method (DTEM, PatchMerger, LTM) on a frozen ViT by distillation."""
    from ..errors import UserError

    rec = common.resolve_target(model, recipe, method, r, inflect, per_layer, keep, prop_attn, formulation)
    check_writable(out, "dir", force=bool(force or resume), what="--out", marker=RECIPE)
    check_writable(lib.checkpoint_path(out), "file", what="checkpoint")
    if recipe is None and not common.schedule_given(r, inflect, per_layer, keep) and not is_artifact(model):
        rec, note = lib.default_schedule(rec)  # the learned method's own default, said out loud
        if note:
            common.console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if val_resize not in data.RESIZE_MODES:
        raise UserError(f"--val-resize must be one of {', '.join(data.RESIZE_MODES)}, got {val_resize!r}")
    config = lib.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, clip_grad=clip_grad or None, feature_weight=feature_weight,
        ce_weight=ce_weight, augment=augment, finetune=finetune, limit=limit, workers=workers, seed=seed,
        val=str(val) if val else None, val_limit=val_limit, val_resize=val_resize,
    )
    with common.progress(*COLUMNS, disable=json_) as bar:
        try:
            res = lib.train(rec, images, out, config, weights=weights, random_weights=random_weights,
                            resume=resume, force=force, progress=_reporter(bar, epochs))
        except lib.TrainingInterrupted as e:
            bar.stop()
            raise common.Interrupted(f"interrupted; resumable checkpoint saved to {e.checkpoint} "
                                     "(continue with --resume)") from None
    if res.out is None:  # not the main process of a distributed run
        return
    if json_:
        common.print_json(res.to_dict())
    else:
        _render(res)


def register(app: typer.Typer) -> None:
    app.command()(train)
