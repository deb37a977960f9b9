"""`tomectl train`: fit a learned reduction (DTEM, PatchMerger, LTM) on a frozen ViT.

Users have a pretrained ViT and a folder of their own images, often without labels, so the loss is
distillation from the unreduced model (the same backbone with the reduction switched off, or a
frozen copy of it with `finetune`):

    loss = KL(unreduced || reduced logits) + feature_weight * MSE(pre-logits features)
           + ce_weight * CE(labels)   (only where the images have labels)
           + the method's own `aux_loss` (LTM's information-bottleneck bound)

Only the method's modules learn (`model.tomectl_modules`); the backbone stays frozen and in eval
mode, unless `finetune`. timm's training augmentation, AdamW (timm's optimizer factory: no weight
decay on biases and norms), a per-step cosine schedule with warm-up, gradient clipping.

Runs on CPU, one GPU, or several through ``torchrun`` (PyTorch DDP; gloo on CPU, nccl on GPU):
the same command. Each process takes its share of every epoch's shuffled order.

Checkpoints: ``OUT.ckpt`` is written (atomically) after every epoch and when the run is
interrupted (Ctrl-C), with the position inside the epoch; `resume` continues from it exactly (the
order of an epoch depends only on the seed and the epoch). When training ends the artifact
directory OUT is written atomically (recipe.yaml with `learned: learned.safetensors`, summary.json,
learned.safetensors, train.json, and model.safetensors after `finetune`) and the checkpoint removed.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import __version__
from .artifact import (
    LEARNED,
    MODEL_WEIGHTS,
    RECIPE,
    SUMMARY,
    TRAIN_LOG,
    atomic_dir,
    atomic_file,
    recipe_document,
    save_learned,
    write_json,
    write_yaml,
)
from .build import Built, build
from .errors import UserError
from .recipe import Recipe
from .reduce import get_method

AUGMENTS = ("timm", "none")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: Optional[float] = 1.0
    feature_weight: float = 0.0
    ce_weight: float = 0.5
    augment: str = "timm"
    finetune: bool = False
    limit: Optional[int] = None
    workers: Optional[int] = None
    seed: int = 0
    val: Optional[str] = None  # images to measure agreement with the unreduced model after each epoch
    val_limit: Optional[int] = None
    val_resize: str = "timm"

    def check(self) -> None:
        def positive(name, v, integer=False):
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                    or (integer and not isinstance(v, int))):
                raise UserError(f"--{name.replace('_', '-')} must be a "
                                f"{'whole ' if integer else ''}number > 0, got {v!r}")

        positive("epochs", self.epochs, True)
        positive("batch_size", self.batch_size, True)
        positive("lr", self.lr)
        for name in ("min_lr", "weight_decay", "warmup_epochs", "feature_weight", "ce_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {v!r}")
        if self.clip_grad is not None:
            positive("clip_grad", self.clip_grad)
        if self.augment not in AUGMENTS:
            raise UserError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")


@dataclass
class EpochLog:
    epoch: int
    loss: float
    kl: float
    aux: float
    ce: Optional[float]
    lr: float
    images: int
    seconds: float
    img_per_s: float
    agreement: Optional[float] = None  # on the val images, hard (eval-mode) reduced vs unreduced
    kl_val: Optional[float] = None
    top1_val: Optional[float] = None


@dataclass
class TrainResult:
    out: Optional[str]
    recipe: dict
    config: dict
    epochs: list[EpochLog] = field(default_factory=list)
    images: int = 0
    labelled: bool = False
    trainable_params: int = 0
    seconds: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    gmacs: Optional[float] = None
    gmacs_base: Optional[float] = None
    interrupted: bool = False
    checkpoint: Optional[str] = None
    val_reference: Optional[dict] = None
    val_initial: Optional[dict] = None  # agreement / KL on the val images before training

    def to_dict(self) -> dict:
        d = asdict(self)
        d["epochs"] = [asdict(e) for e in self.epochs]
        return d


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda:  # share the CPU between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_mean(d: Dist, values: list[float]) -> list[float]:
    if d.world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)  # nccl reduces GPU tensors only
    dist.all_reduce(t)
    return (t / d.world).tolist()


def _every_rank_has(d: Dist, n: int) -> bool:
    """Whether every process's batch holds an image. A batch can be empty (all its images
    undecodable); DDP's gradient all-reduce would then wait forever for that process, so under DDP
    the processes agree first and skip the step together."""
    if d.world <= 1:
        return n > 0
    import torch.distributed as dist

    t = torch.tensor([1 if n > 0 else 0], dtype=torch.int32, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This process's share of epoch `epoch`'s order: a permutation fixed by (seed, epoch), padded by
    wrapping so every process gets the same number of images."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per = math.ceil(n / world)
    order = (order * math.ceil(per * world / n))[: per * world]
    return order[rank::world]


# ---------------------------------------------------------------------------------------------


def _train_transform(preproc: dict, augment: str):
    from timm.data import create_transform

    from .data import make_transform

    if augment == "none":
        return make_transform(preproc, "timm")
    return create_transform(input_size=tuple(preproc["input_size"]), is_training=True,
                            interpolation=preproc["interpolation"], mean=tuple(preproc["mean"]),
                            std=tuple(preproc["std"]))


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _pre_logits_tap(model):
    """Forward hook on the classifier head: keeps its input (the pre-logits features)."""
    box: dict = {}

    def hook(module, inputs, output):
        box["features"] = inputs[0]

    head = getattr(model, "head", None)
    handle = head.register_forward_hook(hook) if isinstance(head, torch.nn.Module) else None
    return box, handle


def _aux_loss(modules) -> torch.Tensor:
    total = None
    for m in modules.modules():
        a = getattr(m, "aux_loss", None)
        if isinstance(a, torch.Tensor):
            total = a if total is None else total + a
    return total


def distillation_loss(model, x: torch.Tensor, *, teacher=None, labels: Optional[torch.Tensor] = None,
                      ce_weight: float = 0.0, feature_weight: float = 0.0, student=None,
                      taps: Optional[tuple] = None) -> tuple[torch.Tensor, dict]:
    """The training loss on one batch and its parts {kl, aux, ce} (see the module docstring).

    The reference is `teacher` (a frozen copy) or, by default, `model` itself with its reduction
    switched off (same frozen weights). `student` is what runs the reduced forward (the DDP wrapper
    of `model` in a distributed run). `taps` = (student box, teacher box) from `_pre_logits_tap`,
    needed for feature distillation.
    """
    from .evaluate import reduction_off

    student = model if student is None else student
    with torch.no_grad():
        if teacher is not None:
            t_logits = teacher(x)
        else:
            with reduction_off(model):
                t_logits = model(x)
        t_feat = None
        if taps is not None:
            t_feat = (taps[1] if teacher is not None else taps[0]).get("features")
    s_logits = student(x)
    kl = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                  reduction="batchmean", log_target=True)
    loss = kl
    if feature_weight > 0 and taps is not None and t_feat is not None:
        loss = loss + feature_weight * F.mse_loss(taps[0]["features"], t_feat)
    modules = getattr(model, "tomectl_modules", None)
    aux = _aux_loss(modules) if modules is not None else None
    if aux is not None:
        loss = loss + aux
    ce = None
    if labels is not None and ce_weight > 0:
        ce = F.cross_entropy(s_logits, labels)
        loss = loss + ce_weight * ce
    return loss, {"kl": kl, "aux": aux, "ce": ce}


def _no_weight_decay(root: torch.nn.Module) -> set[str]:
    """Full names of the parameters that their modules exempt from weight decay (a module's
    ``no_weight_decay()``, as timm's models declare it: PatchMerger's queries, whose norm is their
    sharpness; a ViT's position embedding and class token with --finetune)."""
    names: set[str] = set()
    for prefix, module in root.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _awaits_data_init(model) -> bool:
    """Whether a learned module initialises itself on its first training batch (it declares an
    `initialised` buffer that is still false): then one forward pass runs before training."""
    modules = getattr(model, "tomectl_modules", None)
    return modules is not None and any(
        isinstance(getattr(m, "initialised", None), torch.Tensor) and not bool(m.initialised)
        for m in modules.modules()
    )


def _trainable(built: Built, finetune: bool) -> list[torch.nn.Parameter]:
    model = built.model
    modules = getattr(model, "tomectl_modules", None)
    for p in model.parameters():
        p.requires_grad_(finetune)
    if modules is not None:
        for key, mod in modules.items():
            used = built.removed[int(key)] > 0  # a module of a block that removes nothing never runs
            for p in mod.parameters():
                p.requires_grad_(used)
    return [p for p in model.parameters() if p.requires_grad]


def _set_modes(model, finetune: bool, training: bool) -> None:
    if finetune:
        model.train(training)
    else:
        model.eval()  # frozen backbone: no dropout / drop-path, deterministic
        modules = getattr(model, "tomectl_modules", None)
        if modules is not None:
            modules.train(training)


def train(recipe: Recipe, images: str | Path, out: Optional[str | Path],
          config: Optional[TrainConfig] = None, *,
          weights=None, random_weights: bool = False, resume: bool = False, force: bool = False,
          progress: Optional[Callable[[str, dict], None]] = None) -> TrainResult:
    """Train the learned parameters of `recipe`'s method and write the artifact `out`.

    progress(event, info): "start" {total_steps, steps_per_epoch}, "step" {epoch, step, loss, img_per_s},
    "epoch" {EpochLog as dict}, "val" {epoch}. Only the main process reports and writes.
    """
    from . import data as data_mod
    from .compress import report as model_report
    from .evaluate import predict
    from .metrics import compare
    from .models import preprocessing

    config = TrainConfig() if config is None else config
    config.check()
    method = get_method(recipe.method, recipe.method_options)
    if not method.learned and not config.finetune:
        raise UserError(f"method {recipe.method!r} has nothing to learn; use a learned method "
                        "(dtem, patchmerger, ltm) or --finetune to fine-tune the backbone")
    if method.trains_with_prop_attn and not recipe.prop_attn:
        raise UserError(f"method {recipe.method!r} trains through proportional attention "
                        "(a merged-away token vanishes by its log-size); drop --no-prop-attn")
    if out is None:
        raise UserError("give --out DIR for the trained artifact")
    out = Path(out)
    ckpt_file = checkpoint_path(out)
    if out.exists() and not force and not resume:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if resume and not ckpt_file.is_file():
        raise UserError(f"nothing to resume: {ckpt_file} does not exist")

    d = init_distributed()
    torch.manual_seed(config.seed + d.rank)
    built = build(recipe, weights=weights, random_weights=random_weights, allow_untrained=True)
    model = built.model.to(d.device)
    teacher = None
    if config.finetune:  # the reference must stay the original model
        from .adapters import adapter_for

        teacher = adapter_for(model).remove(copy.deepcopy(model)).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = _trainable(built, config.finetune)
    if not params:
        raise UserError("nothing to train: the schedule removes no tokens at any block "
                        "with learned parameters")

    samples = data_mod.scan(images, limit=config.limit)
    labelled = all(s.label >= 0 for s in samples)
    preproc = preprocessing(model)
    dataset = data_mod.ImageDataset(samples, _train_transform(preproc, config.augment))
    steps_per_epoch = math.ceil(math.ceil(len(samples) / d.world) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    from timm.scheduler import CosineLRScheduler

    trainable_root = model if config.finetune else model.tomectl_modules
    groups = param_groups_weight_decay(trainable_root, config.weight_decay,
                                       no_weight_decay_list=_no_weight_decay(trainable_root))
    optimizer = create_optimizer_v2(groups, opt="adamw", lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))
    # the cosine spans the steps after the warm-up, so the last step reaches --min-lr
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=config.min_lr,
                                  warmup_t=warmup, warmup_lr_init=config.lr * 0.01, warmup_prefix=True,
                                  t_in_epochs=False)

    result = TrainResult(out=None, recipe=recipe.to_dict(), config=asdict(config), images=len(samples),
                         labelled=labelled, trainable_params=sum(p.numel() for p in params),
                         world_size=d.world, device=str(d.device))
    start_epoch, start_step, elapsed = 0, 0, 0.0
    # what fixes the order and length of every epoch: a resume must see the same
    run_key = {"images": len(samples), "world_size": d.world, "seed": config.seed, "limit": config.limit,
               "epochs": config.epochs, "batch_size": config.batch_size, "finetune": config.finetune}
    resumed_partial = None
    if resume:
        try:
            ck = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise UserError(f"{ckpt_file} is not a tomectl training checkpoint "
                            f"({type(e).__name__})") from None
        same = {k: ck["recipe"].get(k) == result.recipe.get(k)
                for k in ("model", "method", "schedule", "options")}
        if not all(same.values()):
            bad = [k for k, v in same.items() if not v][0]
            raise UserError(f"{ckpt_file} was made with another {bad}; resume with the same command")
        old = ck.get("run") or {}
        diff = [k for k, v in run_key.items() if k in old and old[k] != v]
        if diff:
            k = diff[0]
            raise UserError(f"{ckpt_file} was made with {k.replace('_', ' ')} {old[k]!r}, "
                            f"this run has {run_key[k]!r}; "
                            "resume with the same images, processes and options")
        (model if config.finetune else model.tomectl_modules).load_state_dict(ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, start_step, elapsed = ck["epoch"], ck["step"], ck["seconds"]
        resumed_partial = ck.get("partial")
        result.epochs = [EpochLog(**e) for e in ck["log"]]
        result.val_initial = ck.get("val_initial")

    if not resume and _awaits_data_init(model):  # PatchMerger's queries, before DDP syncs rank 0's state
        first = data_mod.collate([dataset[i]
                                  for i in epoch_indices(len(samples), config.seed, 0, d.rank, d.world)
                                  [: config.batch_size]])
        if len(first.images):
            _set_modes(model, config.finetune, True)
            with torch.no_grad():
                model(first.images.to(d.device))
    val_ref = val_loader = None
    if config.val and d.main:
        val_samples = data_mod.scan(config.val, limit=config.val_limit)
        val_loader = data_mod.loader(val_samples, preproc, config.val_resize, batch_size=64,
                                     workers=config.workers)
        from .evaluate import reduction_off

        model.eval()
        if teacher is not None:
            val_ref = predict(teacher, val_loader)
        else:
            with reduction_off(model):
                val_ref = predict(model, val_loader)
        result.val_reference = {"images": len(val_ref), "data": str(config.val)}
        if not resume:  # where training starts from (DTEM: ToMe's matching; PatchMerger: its k-means init)
            c = compare(val_ref, predict(model, val_loader), None)
            result.val_initial = {"agreement": c.agreement, "kl": c.kl}

    # DDP after the data-dependent init: its constructor gives every process rank 0's state
    ddp_model = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    box, hook = _pre_logits_tap(model)
    tbox, thook = _pre_logits_tap(teacher) if teacher is not None else (None, None)
    taps = (box, tbox) if config.feature_weight > 0 else None

    def save_checkpoint(epoch: int, step: int, seconds: float, partial_epoch: Optional[dict] = None) -> None:
        if not d.main:
            return
        state = {
            "recipe": result.recipe, "config": asdict(config), "epoch": epoch, "step": step,
            "seconds": seconds, "partial": partial_epoch if step else None, "run": run_key,
            "trainable": (model if config.finetune else model.tomectl_modules).state_dict(),
            "optimizer": optimizer.state_dict(), "log": [asdict(e) for e in result.epochs],
            "val_initial": result.val_initial,
            "tomectl_version": __version__,
        }
        with atomic_file(ckpt_file) as tmp:
            torch.save(state, tmp)

    if progress and d.main:
        progress("start", {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                           "done": start_epoch * steps_per_epoch + start_step})
    t_start = time.perf_counter() - elapsed
    position = (start_epoch, start_step)  # where a resume would continue
    partial = resumed_partial
    pending: Optional[EpochLog] = None  # an epoch whose batches are done but which is not logged yet
    try:
        for epoch in range(start_epoch, config.epochs):
            idx = epoch_indices(len(samples), config.seed, epoch, d.rank, d.world)
            skip = start_step if epoch == start_epoch else 0
            subset = torch.utils.data.Subset(dataset, idx[skip * config.batch_size:])
            workers = (config.workers if config.workers is not None
                       else min(4, max(0, (os.cpu_count() or 1) - 1)))
            loader = torch.utils.data.DataLoader(subset, batch_size=config.batch_size, shuffle=False,
                                                 num_workers=workers, collate_fn=data_mod.collate,
                                                 drop_last=False)
            _set_modes(model, config.finetune, True)
            sums = {"loss": 0.0, "kl": 0.0, "aux": 0.0, "ce": 0.0}
            seen, t_epoch = 0, time.perf_counter()
            if skip and partial:  # the first part of this epoch ran before the interruption
                sums, seen = dict(partial["sums"]), partial["seen"]
                t_epoch -= partial["seconds"]
            partial, pending = None, None
            step = skip
            position = (epoch, step)
            for batch in loader:
                x = batch.images.to(d.device)
                if not _every_rank_has(d, len(x)):  # an empty batch here or on another process
                    step += 1
                    continue
                labels = batch.labels.to(d.device) if labelled and config.ce_weight > 0 else None
                loss, parts = distillation_loss(model, x, teacher=teacher, labels=labels,
                                                ce_weight=config.ce_weight,
                                                feature_weight=config.feature_weight, student=ddp_model,
                                                taps=taps)
                kl, aux, ce = parts["kl"], parts["aux"], parts["ce"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
                optimizer.step()
                step += 1
                scheduler.step_update(num_updates=epoch * steps_per_epoch + step)
                n = len(x)
                seen += n
                sums["loss"] += loss.item() * n
                sums["kl"] += kl.item() * n
                sums["aux"] += (aux.item() if aux is not None else 0.0) * n
                sums["ce"] += (ce.item() if ce is not None else 0.0) * n
                position = (epoch, step)
                partial = {"sums": dict(sums), "seen": seen, "seconds": time.perf_counter() - t_epoch}
                if progress and d.main:
                    progress("step", {"epoch": epoch, "step": step, "loss": loss.item(),
                                      "img_per_s": seen * d.world / max(1e-9, time.perf_counter() - t_epoch)})
            secs = time.perf_counter() - t_epoch
            means = _all_mean(d, [sums[k] / max(1, seen) for k in ("loss", "kl", "aux", "ce")])
            log = EpochLog(epoch=epoch + 1, loss=means[0], kl=means[1], aux=means[2],
                           ce=means[3] if labelled and config.ce_weight > 0 else None,
                           lr=optimizer.param_groups[0]["lr"], images=seen * d.world, seconds=secs,
                           img_per_s=seen * d.world / max(1e-9, secs))
            pending = log
            if val_loader is not None:
                if progress:
                    progress("val", {"epoch": epoch + 1})
                _set_modes(model, config.finetune, False)
                logits = predict(model, val_loader)
                c = compare(val_ref, logits, None)
                log.agreement, log.kl_val = c.agreement, c.kl
            _barrier(d)
            result.epochs.append(log)
            pending, partial = None, None
            position = (epoch + 1, 0)
            save_checkpoint(epoch + 1, 0, time.perf_counter() - t_start)
            if progress and d.main:
                progress("epoch", asdict(log))
    except KeyboardInterrupt:
        if pending is not None:  # every batch of the epoch ran, its val pass did not: log it without
            result.epochs.append(pending)
            position, partial = (pending.epoch, 0), None
        save_checkpoint(*position, time.perf_counter() - t_start, partial)
        result.interrupted = True
        result.checkpoint = str(ckpt_file)
        raise TrainingInterrupted(str(ckpt_file)) from None
    finally:
        for h in (hook, thook):
            if h is not None:
                h.remove()

    result.seconds = time.perf_counter() - t_start
    _set_modes(model, config.finetune, False)
    macs, base = built.macs(), built.base_macs()
    result.gmacs, result.gmacs_base = macs.gmacs, base.gmacs
    if d.main:
        _write_artifact(built, recipe, out, result, config, force=force or resume, model_report=model_report)
        result.out = str(out)
        ckpt_file.unlink(missing_ok=True)
    _barrier(d)
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


class TrainingInterrupted(Exception):
    """Raised (as a KeyboardInterrupt stand-in) after the resumable checkpoint is saved."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(checkpoint)
        self.checkpoint = checkpoint


def _write_artifact(built: Built, recipe: Recipe, out: Path, result: TrainResult, config: TrainConfig, *,
                    force: bool, model_report) -> None:
    from .adapters import adapter_for
    from .models import preprocessing, sha256_of
    from .provenance import machine, now, versions

    model = built.model.cpu()
    with atomic_dir(out, force=force) as tmp:
        rep = model_report(built, measure=True)
        weights = rep.weights
        if config.finetune:
            from safetensors.torch import save_file

            adapter = adapter_for(model)
            plan, modules = model.tomectl_plan, getattr(model, "tomectl_modules", None)
            adapter.remove(model)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_WEIGHTS))
            adapter.install(model, plan, modules=modules)
            weights = {"source": "file", "path": str((out / MODEL_WEIGHTS).resolve()),
                       "sha256": sha256_of(tmp / MODEL_WEIGHTS)}
        doc = recipe_document(recipe, built.removed, built.tokens, weights, __version__)
        if getattr(model, "tomectl_modules", None) is not None and len(model.tomectl_modules):
            save_learned(model, tmp / LEARNED)
            doc["learned"] = {"path": LEARNED, "sha256": sha256_of(tmp / LEARNED)}
        write_yaml(tmp / RECIPE, doc)
        summary = rep.to_dict()
        summary.pop("out", None)
        summary.update(weights=weights, protected_tokens=adapter_for(model).protected_tokens(model),
                       options=recipe.options, preprocessing=preprocessing(model), versions=versions(),
                       machine=machine(), created=now(), trained=True)
        write_json(tmp / SUMMARY, summary)
        result_doc = replace(result, out=str(out)).to_dict()
        write_json(tmp / TRAIN_LOG, result_doc)
