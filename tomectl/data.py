"""Images for evaluation, calibration and training.

Three layouts are read:
- an ImageFolder tree named by WordNet ids (``n01440764/xxx.JPEG``, the ImageNet layout). Class
  indices come from the canonical ImageNet-1k wnid order (timm's `ImageNetInfo`), never from
  the folders that happen to be present (a subset with 725 of 1,000 classes would otherwise be
  numbered wrongly);
- a labels file: ``relative/or/absolute/path label`` per line (label an int index or a wnid);
- any folder of images without labels (recursively): labels are -1.

An image that cannot be decoded is skipped and counted (`SkipCounter`), never a crash.
Preprocessing is the model's timm config ("timm": resize + centre crop), or "squash": resize
straight to the input size, for sets already squashed to a square.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
RESIZE_MODES = ("timm", "squash")


def imagenet_wnids() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # -1: unlabelled


def scan(root: str | Path, labels_file: Optional[str | Path] = None,
         limit: Optional[int] = None) -> list[Sample]:
    """List the images (and labels) of a data source; deterministic order."""
    root = Path(root)
    if labels_file is not None:
        return _scan_labels_file(root, Path(labels_file), limit)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of images")
    wnids = {w: i for i, w in enumerate(imagenet_wnids())}
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    samples: list[Sample] = []
    if subdirs and all(d.name in wnids for d in subdirs):
        for d in subdirs:
            for f in sorted(d.iterdir()):
                if _is_image(f):
                    samples.append(Sample(str(f), wnids[d.name]))
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                f = Path(dirpath) / name
                if _is_image(f):
                    samples.append(Sample(str(f), -1))
    if not samples:
        raise UserError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    if limit is not None:
        samples = _spread(samples, limit)
    return samples


def _spread(samples: list[Sample], limit: int) -> list[Sample]:
    """`limit` samples spread evenly over the list (so a small limit still covers many classes)."""
    if limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if limit >= len(samples):
        return samples
    step = len(samples) / limit
    return [samples[int(i * step)] for i in range(limit)]


def _scan_labels_file(root: Path, labels_file: Path, limit: Optional[int]) -> list[Sample]:
    if not labels_file.is_file():
        raise UserError(f"labels file {labels_file} does not exist")
    wnids = {w: i for i, w in enumerate(imagenet_wnids())}
    samples = []
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserError(f"{labels_file}:{n}: expected 'path label', got {line!r}")
        path, label = parts
        if label in wnids:
            idx = wnids[label]
        else:
            try:
                idx = int(label)
            except ValueError:
                raise UserError(f"{labels_file}:{n}: label {label!r} "
                                "is neither a class index nor a wnid") from None
        p = Path(path)
        samples.append(Sample(str(p if p.is_absolute() else root / p), idx))
    if not samples:
        raise UserError(f"labels file {labels_file} lists no images")
    return _spread(samples, limit) if limit else samples


def make_transform(preproc: dict, resize: str = "timm"):
    """torchvision transform from a model's preprocessing dict (see models.preprocessing)."""
    from timm.data import create_transform
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if resize not in RESIZE_MODES:
        raise UserError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    size = tuple(preproc["input_size"][1:])
    if resize == "squash":
        interp = InterpolationMode(preproc["interpolation"]) if preproc["interpolation"] != "random" \
            else InterpolationMode.BICUBIC
        return T.Compose([
            T.Resize(size, interpolation=interp),
            T.ToTensor(),
            T.Normalize(preproc["mean"], preproc["std"]),
        ])
    return create_transform(
        input_size=tuple(preproc["input_size"]), interpolation=preproc["interpolation"],
        mean=tuple(preproc["mean"]), std=tuple(preproc["std"]), crop_pct=preproc["crop_pct"],
        crop_mode=preproc.get("crop_mode", "center"),
    )


class ImageDataset(Dataset):
    """Decodes images; an undecodable one yields None (dropped and counted by `collate`)."""

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        try:
            with Image.open(s.path) as im:
                img = self.transform(im.convert("RGB"))
        except Exception:  # truncated, corrupt or not an image at all
            return None, i
        return (img, s.label), i


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor  # positions in the sample list
    skipped: list[int]  # positions that could not be decoded


def collate(items) -> Batch:
    good = [(x, i) for x, i in items if x is not None]
    skipped = [i for x, i in items if x is None]
    if good:
        images = torch.stack([x[0] for x, _ in good])
        labels = torch.tensor([x[1] for x, _ in good])
    else:
        images, labels = torch.empty(0), torch.empty(0, dtype=torch.long)
    return Batch(images, labels, torch.tensor([i for _, i in good], dtype=torch.long), skipped)


def loader(samples: list[Sample], preproc: dict, resize: str = "timm", batch_size: int = 32,
           workers: Optional[int] = None) -> DataLoader:
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    return DataLoader(ImageDataset(samples, make_transform(preproc, resize)), batch_size=batch_size,
                      shuffle=False, num_workers=workers, collate_fn=collate)


def load_images(root, preproc: dict, n: int, resize: str = "timm") -> torch.Tensor:
    """Up to `n` decoded images from `root` as one tensor [n, 3, H, W] (calibration, parity checks)."""
    samples = scan(root, limit=n)
    ds = ImageDataset(samples, make_transform(preproc, resize))
    imgs = [item[0][0] for item in (ds[i] for i in range(len(ds))) if item[0] is not None]
    if not imgs:
        raise UserError(f"none of the images in {root} could be decoded")
    return torch.stack(imgs)
