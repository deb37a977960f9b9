"""What a training run takes (`TrainConfig`, checked in one place) and what it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import UserError

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
    skipped_images: int = 0  # training images that could not be decoded (skipped in every epoch)
    notes: list[str] = field(default_factory=list)  # what the user should know (skipped images, defaults)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["epochs"] = [asdict(e) for e in self.epochs]
        return d
