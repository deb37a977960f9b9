"""The trainer: setup, resume, one epoch, validation, checkpoints, and the artifact at the end."""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..artifact import MODEL_WEIGHTS, TRAIN_LOG, atomic_dir, atomic_file, save_learned, write_json
from ..build import Built, build
from ..errors import UserError
from ..recipe import Recipe
from ..reduce import get_method
from ..reduced import learned_modules
from .config import EpochLog, TrainConfig, TrainResult
from .dist import _all_mean, _barrier, _every_rank_has, epoch_indices, init_distributed
from .loss import _pre_logits_tap, distillation_loss

ProgressFn = Callable[[str, dict], None]  # (event, info)
LOSS_PARTS = ("loss", "kl", "aux", "ce")


class TrainingInterrupted(Exception):
    """Raised (as a KeyboardInterrupt stand-in) after the resumable checkpoint is saved."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(checkpoint)
        self.checkpoint = checkpoint


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _train_transform(preproc: dict, augment: str):
    from timm.data import create_transform

    from ..data import make_transform

    if augment == "none":
        return make_transform(preproc, "timm")
    return create_transform(input_size=tuple(preproc["input_size"]), is_training=True,
                            interpolation=preproc["interpolation"], mean=tuple(preproc["mean"]),
                            std=tuple(preproc["std"]))


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
    modules = learned_modules(model)
    return modules is not None and any(
        isinstance(getattr(m, "initialised", None), torch.Tensor) and not bool(m.initialised)
        for m in modules.modules()
    )


def _trainable(built: Built, finetune: bool) -> list[torch.nn.Parameter]:
    model = built.model
    modules = built.modules
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
        modules = learned_modules(model)
        if modules is not None:
            modules.train(training)


#: PatchMerger's setting in its paper (Renggli et al. 2022): one merger halfway through the blocks,
#: turning the tokens into 8 (ViT-B/16: after block 6 of 12)
PATCHMERGER_TOKENS_OUT = 8
SCHEDULE_FLAGS = "--r N (tokens merged per block), --keep F or --per-layer LIST"


def default_schedule(recipe: Recipe) -> tuple[Recipe, Optional[str]]:
    """`recipe` with its learned method's default schedule, for a `train` given no schedule, and a
    sentence saying what it is (None: not a learned method; `recipe` unchanged). PatchMerger has one
    in its paper (one merger at the method's block, by default the middle one, keeping
    PATCHMERGER_TOKENS_OUT tokens); DTEM's and LTM's papers fix no single reduction, so they are
    refused with the flags to pass."""
    import timm

    from ..adapters.vit import num_layers, num_tokens, protected_tokens
    from ..schedule import Schedule

    method = get_method(recipe.method, recipe.method_options)
    if not method.learned:  # refused or fine-tuned as it is (`_check_request`)
        return recipe, None
    if recipe.method != "patchmerger":
        raise UserError(f"method {recipe.method!r} needs a schedule, and its paper fixes no single default: "
                        f"pass {SCHEDULE_FLAGS} (e.g. --r 13, ToMe's setting for ViT-S)")
    with torch.device("meta"):  # only the geometry: no memory, no weights
        model = timm.create_model(recipe.model, pretrained=False)
    n_layers, protected = num_layers(model), protected_tokens(model)
    n_free = num_tokens(model) - protected
    layers = method.layers(n_layers) or (n_layers // 2,)
    keep = min(PATCHMERGER_TOKENS_OUT, n_free)
    per_layer = [0] * n_layers
    per_layer[layers[0]] = n_free - keep
    schedule = Schedule.make(per_layer=per_layer, where="patchmerger's default schedule")
    note = (f"no schedule given: PatchMerger's default (Renggli et al. 2022), one merger at block "
            f"{layers[0]} of {n_layers} turning {n_free} tokens into {keep}; pass {SCHEDULE_FLAGS} to choose")
    return replace(recipe, schedule=schedule), note


def _check_request(recipe: Recipe, out: Optional[str | Path], config: TrainConfig, resume: bool,
                   force: bool) -> Path:
    """What can be refused before any model is built; the checkpoint path."""
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
    ckpt_file = checkpoint_path(out)
    if Path(out).exists() and not force and not resume:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if resume and not ckpt_file.is_file():
        raise UserError(f"nothing to resume: {ckpt_file} does not exist")
    return ckpt_file


class Trainer:
    """One training run (see the package docstring). `run()` trains and writes the artifact; on
    Ctrl-C it saves the checkpoint and raises `TrainingInterrupted`. Only the main process reports
    and writes."""

    def __init__(self, recipe: Recipe, images: str | Path, out: Optional[str | Path],
                 config: Optional[TrainConfig] = None, *, weights=None, random_weights: bool = False,
                 resume: bool = False, force: bool = False, progress: Optional[ProgressFn] = None):
        self.config = TrainConfig() if config is None else config
        self.ckpt_file = _check_request(recipe, out, self.config, resume, force)
        self.recipe, self.images, self.out = recipe, images, Path(out)
        self.weights, self.random_weights = weights, random_weights
        self.resume, self.force, self.progress = resume, force, progress
        self.start_epoch, self.start_step, self.elapsed = 0, 0, 0.0
        self.partial: Optional[dict] = None  # sums of the epoch in progress, for a checkpoint inside it
        self.pending: Optional[EpochLog] = None  # an epoch whose batches are done but not logged yet
        self.val_ref = self.val_loader = None
        self.hooks: list = []

    def run(self) -> TrainResult:
        self._scan_images()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        if self.resume:
            self._load_checkpoint()
        elif _awaits_data_init(self.model):  # PatchMerger's queries, before DDP syncs rank 0's state
            self._data_init()
        if self.config.val and self.d.main:
            self._setup_val()
        self._wrap()
        self._loop()
        return self._finish()

    # --- setup ----------------------------------------------------------------------------------

    @property
    def _trained(self) -> torch.nn.Module:
        """What learns and what the checkpoint keeps: the learned modules, or all with --finetune."""
        return self.model if self.config.finetune else self.built.modules

    def _setup_model(self) -> None:
        self.d = d = init_distributed()
        torch.manual_seed(self.config.seed + d.rank)
        self.built = build(self.recipe, weights=self.weights, random_weights=self.random_weights,
                           allow_untrained=True)
        self.model = self.built.model.to(d.device)
        self.teacher = None
        if self.config.finetune:  # the reference must stay the original model
            from .. import remove

            self.teacher = remove(copy.deepcopy(self.model)).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.params = _trainable(self.built, self.config.finetune)
        if not self.params:
            raise UserError("nothing to train: the schedule removes no tokens at any block "
                            f"with learned parameters; pass {SCHEDULE_FLAGS}")

    def _scan_images(self) -> None:
        """The training (and --val) images, before any model is built: a folder where no image
        decodes is refused here, not trained on."""
        from .. import data

        cfg = self.config
        self.samples = data.scan(self.images, limit=cfg.limit)
        data.require_decodable(self.samples, self.images)
        self.val_samples = None
        if cfg.val:
            self.val_samples = data.scan(cfg.val, limit=cfg.val_limit)
            data.require_decodable(self.val_samples, cfg.val)
        self.skipped: set[int] = set()  # this process's undecodable images (sample indices)

    def _setup_data(self) -> None:
        from .. import data
        from ..models import preprocessing

        cfg, d = self.config, self.d
        self.labelled = all(s.label >= 0 for s in self.samples)
        self.preproc = preprocessing(self.model)
        self.dataset = data.ImageDataset(self.samples, _train_transform(self.preproc, cfg.augment))
        self.steps_per_epoch = math.ceil(math.ceil(len(self.samples) / d.world) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.result = TrainResult(
            out=None, recipe=self.recipe.to_dict(), config=asdict(cfg), images=len(self.samples),
            labelled=self.labelled, trainable_params=sum(p.numel() for p in self.params),
            world_size=d.world, device=str(d.device))
        # what fixes the order and length of every epoch: a resume must see the same
        self.run_key = {"images": len(self.samples), "world_size": d.world, "seed": cfg.seed,
                        "limit": cfg.limit, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                        "finetune": cfg.finetune}

    def _setup_optimizer(self) -> None:
        """AdamW (no weight decay on biases, norms and what modules exempt) and a per-step cosine
        with warm-up that reaches --min-lr on the last step."""
        from timm.optim import create_optimizer_v2, param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler

        cfg, root = self.config, self._trained
        groups = param_groups_weight_decay(root, cfg.weight_decay,
                                           no_weight_decay_list=_no_weight_decay(root))
        self.optimizer = create_optimizer_v2(groups, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = min(int(round(cfg.warmup_epochs * self.steps_per_epoch)), max(0, self.total_steps - 1))
        # the cosine spans the steps after the warm-up, so the last step reaches --min-lr
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, self.total_steps - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
            warmup_lr_init=cfg.lr * 0.01, warmup_prefix=True, t_in_epochs=False)

    def _data_init(self) -> None:
        from .. import data

        cfg, d = self.config, self.d
        order = epoch_indices(len(self.samples), cfg.seed, 0, d.rank, d.world)
        first = data.collate([self.dataset[i] for i in order[: cfg.batch_size]])
        if len(first.images):
            _set_modes(self.model, cfg.finetune, True)
            with torch.no_grad():
                self.model(first.images.to(d.device))

    def _setup_val(self) -> None:
        """The unreduced model's logits on the val images (and, on a fresh run, where training starts)."""
        from .. import data
        from ..evaluate import predict
        from ..metrics import compare
        from ..reduced import reduction_off

        cfg = self.config
        self.val_loader = data.loader(self.val_samples, self.preproc, cfg.val_resize, batch_size=64,
                                      workers=cfg.workers)
        self.model.eval()
        if self.teacher is not None:
            self.val_ref = predict(self.teacher, self.val_loader)
        else:
            with reduction_off(self.model):
                self.val_ref = predict(self.model, self.val_loader)
        self.result.val_reference = {"images": len(self.val_ref), "data": str(cfg.val)}
        # where training starts from (DTEM: ToMe's matching; PatchMerger: its k-means init)
        if not self.resume:
            c = compare(self.val_ref, predict(self.model, self.val_loader), None)
            self.result.val_initial = {"agreement": c.agreement, "kl": c.kl}

    def _wrap(self) -> None:
        """DDP (after the data-dependent init: its constructor gives every process rank 0's state)
        and the pre-logits taps of feature distillation."""
        self.ddp_model = self.model
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            cuda = self.d.device.type == "cuda"
            self.ddp_model = DDP(self.model, device_ids=[self.d.local_rank] if cuda else None)
        box, hook = _pre_logits_tap(self.model)
        tbox, thook = _pre_logits_tap(self.teacher) if self.teacher is not None else (None, None)
        self.hooks = [h for h in (hook, thook) if h is not None]
        self.taps = (box, tbox) if self.config.feature_weight > 0 else None

    # --- checkpoints ----------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        """Continue from OUT.ckpt: refused where the recipe or what fixes the epochs' order differ."""
        ckpt_file = self.ckpt_file
        try:
            ck = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise UserError(f"{ckpt_file} is not a tomectl training checkpoint "
                            f"({type(e).__name__})") from None
        same = {k: ck["recipe"].get(k) == self.result.recipe.get(k)
                for k in ("model", "method", "schedule", "options")}
        if not all(same.values()):
            bad = [k for k, v in same.items() if not v][0]
            raise UserError(f"{ckpt_file} was made with another {bad}; resume with the same command")
        old = ck.get("run") or {}
        diff = [k for k, v in self.run_key.items() if k in old and old[k] != v]
        if diff:
            k = diff[0]
            raise UserError(f"{ckpt_file} was made with {k.replace('_', ' ')} {old[k]!r}, "
                            f"this run has {self.run_key[k]!r}; "
                            "resume with the same images, processes and options")
        self._trained.load_state_dict(ck["trainable"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.start_epoch, self.start_step, self.elapsed = ck["epoch"], ck["step"], ck["seconds"]
        self.partial = ck.get("partial")
        self.result.epochs = [EpochLog(**e) for e in ck["log"]]
        self.result.val_initial = ck.get("val_initial")

    def _save_checkpoint(self, epoch: int, step: int, partial_epoch: Optional[dict] = None) -> None:
        if not self.d.main:
            return
        state = {
            "recipe": self.result.recipe, "config": asdict(self.config), "epoch": epoch, "step": step,
            "seconds": time.perf_counter() - self.t_start, "partial": partial_epoch if step else None,
            "run": self.run_key, "trainable": self._trained.state_dict(),
            "optimizer": self.optimizer.state_dict(), "log": [asdict(e) for e in self.result.epochs],
            "val_initial": self.result.val_initial,
            "tomectl_version": __version__,
        }
        with atomic_file(self.ckpt_file) as tmp:
            torch.save(state, tmp)

    # --- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Every epoch from where the run starts; Ctrl-C saves where a resume continues."""
        if self.progress and self.d.main:
            self.progress("start", {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                                    "done": self.start_epoch * self.steps_per_epoch + self.start_step})
        self.t_start = time.perf_counter() - self.elapsed
        self.position = (self.start_epoch, self.start_step)  # where a resume would continue
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
                self.pending = log = self._epoch(epoch)
                self._validate(log)
                _barrier(self.d)
                self.result.epochs.append(log)
                self.pending, self.partial = None, None
                self.position = (epoch + 1, 0)
                self._save_checkpoint(epoch + 1, 0)
                if self.progress and self.d.main:
                    self.progress("epoch", asdict(log))
        except KeyboardInterrupt:
            if self.pending is not None:  # every batch of the epoch ran, its val pass did not: log it without
                self.result.epochs.append(self.pending)
                self.position, self.partial = (self.pending.epoch, 0), None
            self._save_checkpoint(*self.position, self.partial)
            self.result.interrupted = True
            self.result.checkpoint = str(self.ckpt_file)
            raise TrainingInterrupted(str(self.ckpt_file)) from None
        finally:
            for h in self.hooks:
                h.remove()

    def _loader(self, epoch: int, skip: int):
        """This process's share of epoch `epoch`, from batch `skip` on."""
        from .. import data

        cfg, d = self.config, self.d
        idx = epoch_indices(len(self.samples), cfg.seed, epoch, d.rank, d.world)
        subset = torch.utils.data.Subset(self.dataset, idx[skip * cfg.batch_size:])
        workers = cfg.workers if cfg.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
        return torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, shuffle=False,
                                           num_workers=workers, collate_fn=data.collate, drop_last=False)

    def _epoch(self, epoch: int) -> EpochLog:
        """One pass over this process's share of the images; its log (means over all processes)."""
        cfg, d = self.config, self.d
        skip = self.start_step if epoch == self.start_epoch else 0
        loader = self._loader(epoch, skip)
        _set_modes(self.model, cfg.finetune, True)
        sums = dict.fromkeys(LOSS_PARTS, 0.0)
        seen, t_epoch = 0, time.perf_counter()
        if skip and self.partial:  # the first part of this epoch ran before the interruption
            sums, seen = dict(self.partial["sums"]), self.partial["seen"]
            t_epoch -= self.partial["seconds"]
        self.partial, self.pending = None, None
        step = skip
        self.position = (epoch, step)
        for batch in loader:
            self.skipped.update(batch.skipped)
            x = batch.images.to(d.device)
            if not _every_rank_has(d, len(x)):  # an empty batch here or on another process
                step += 1
                continue
            labels = batch.labels.to(d.device) if self.labelled and cfg.ce_weight > 0 else None
            loss, parts = self._step(x, labels)
            step += 1
            self.scheduler.step_update(num_updates=epoch * self.steps_per_epoch + step)
            n = len(x)
            seen += n
            for k, v in (("loss", loss), *parts.items()):
                sums[k] += (v.item() if v is not None else 0.0) * n
            self.position = (epoch, step)
            self.partial = {"sums": dict(sums), "seen": seen, "seconds": time.perf_counter() - t_epoch}
            if self.progress and d.main:
                rate = seen * d.world / max(1e-9, time.perf_counter() - t_epoch)
                self.progress("step", {"epoch": epoch, "step": step, "loss": loss.item(), "img_per_s": rate})
        secs = time.perf_counter() - t_epoch
        means = _all_mean(d, [sums[k] / max(1, seen) for k in LOSS_PARTS])
        return EpochLog(epoch=epoch + 1, loss=means[0], kl=means[1], aux=means[2],
                        ce=means[3] if self.labelled and cfg.ce_weight > 0 else None,
                        lr=self.optimizer.param_groups[0]["lr"], images=seen * d.world, seconds=secs,
                        img_per_s=seen * d.world / max(1e-9, secs))

    def _step(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """One optimisation step on a batch: the loss and its parts {kl, aux, ce}."""
        cfg = self.config
        loss, parts = distillation_loss(self.model, x, teacher=self.teacher, labels=labels,
                                        ce_weight=cfg.ce_weight, feature_weight=cfg.feature_weight,
                                        student=self.ddp_model, taps=self.taps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        self.optimizer.step()
        return loss, parts

    def _validate(self, log: EpochLog) -> None:
        """Agreement and KL of the hard (eval-mode) reduced model with the unreduced one on --val."""
        if self.val_loader is None:
            return
        from ..evaluate import predict
        from ..metrics import compare

        if self.progress:
            self.progress("val", {"epoch": log.epoch})
        _set_modes(self.model, self.config.finetune, False)
        c = compare(self.val_ref, predict(self.model, self.val_loader), None)
        log.agreement, log.kl_val = c.agreement, c.kl

    # --- the end --------------------------------------------------------------------------------

    def _note_skipped(self) -> None:
        """How many training images could not be decoded (all processes; those of the epochs this
        run went through), as the result's `skipped_images` and a note."""
        n = len(self.skipped)
        if self.d.world > 1:
            n = int(round(_all_mean(self.d, [float(n)])[0] * self.d.world))
        self.result.skipped_images = n
        if n:
            first = self.samples[min(self.skipped)].path if self.skipped else ""
            eg = f" (e.g. {first})" if first else ""
            self.result.notes.append(f"{n} of {len(self.samples)} training images could not be decoded "
                                     f"and were skipped{eg}")

    def _finish(self) -> TrainResult:
        result = self.result
        result.seconds = time.perf_counter() - self.t_start
        _set_modes(self.model, self.config.finetune, False)
        macs, base = self.built.macs(), self.built.base_macs()
        result.gmacs, result.gmacs_base = macs.gmacs, base.gmacs
        self._note_skipped()
        if self.d.main:
            _write_artifact(self.built, self.recipe, self.out, result, self.config,
                            force=self.force or self.resume)
            result.out = str(self.out)
            self.ckpt_file.unlink(missing_ok=True)
        _barrier(self.d)
        if self.d.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
        return result


def _write_artifact(built: Built, recipe: Recipe, out: Path, result: TrainResult, config: TrainConfig, *,
                    force: bool) -> None:
    """The artifact (the writer `compress` uses) plus train.json, and model.safetensors after --finetune."""
    from ..compress import report, write_artifact

    model = built.model.cpu()
    with atomic_dir(out, force=force) as tmp:
        rep = report(built, measure=True)
        weights = _save_finetuned(model, tmp, out) if config.finetune else None
        learned = None
        if built.modules is not None and len(built.modules):
            def learned(path: Path) -> None:
                save_learned(model, path)
        write_artifact(tmp, built, recipe, rep, weights=weights, learned=learned, trained=True)
        write_json(tmp / TRAIN_LOG, replace(result, out=str(out)).to_dict())


def _save_finetuned(model, tmp: Path, out: Path) -> dict:
    """The fine-tuned backbone's weights (without the reduction) into the artifact; their record."""
    from safetensors.torch import save_file

    from ..models import sha256_of
    from ..reduced import plain_state_dict

    save_file({k: v.contiguous() for k, v in plain_state_dict(model).items()}, str(tmp / MODEL_WEIGHTS))
    return {"source": "file", "path": str((out / MODEL_WEIGHTS).resolve()),
            "sha256": sha256_of(tmp / MODEL_WEIGHTS)}


def train(recipe: Recipe, images: str | Path, out: Optional[str | Path],
          config: Optional[TrainConfig] = None, *,
          weights=None, random_weights: bool = False, resume: bool = False, force: bool = False,
          progress: Optional[ProgressFn] = None) -> TrainResult:
    """Train the learned parameters of `recipe`'s method and write the artifact `out`.

    progress(event, info): "start" {total_steps, steps_per_epoch}, "step" {epoch, step, loss, img_per_s},
    "epoch" {EpochLog as dict}, "val" {epoch}. Only the main process reports and writes.
    """
    return Trainer(recipe, images, out, config, weights=weights, random_weights=random_weights,
                   resume=resume, force=force, progress=progress).run()
