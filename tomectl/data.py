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
    """Every line must name an existing image and a label that is a class index (a whole number
    >= 0; the model's upper bound is checked where the model is known) or a wnid: anything else is
    refused with its line, so no label is silently taken as "unlabelled"."""
    from .artifact import check_input_file

    check_input_file(labels_file, "labels file", "lines of 'path label' (label: a class index or a wnid)")
    try:
        text = labels_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"labels file {labels_file} is not UTF-8 text; "
                        "expected lines of 'path label'") from None
    wnids = {w: i for i, w in enumerate(imagenet_wnids())}
    samples, missing = [], []
    for n, line in enumerate(text.splitlines(), 1):
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
                idx = -1
            if idx < 0:
                raise UserError(f"{labels_file}:{n}: label {label!r} is neither a class index "
                                "(a whole number >= 0) nor an ImageNet wnid (like n01440764)") from None
        p = Path(path)
        full = p if p.is_absolute() else root / p
        if not full.is_file():
            missing.append((n, path, full))
        samples.append(Sample(str(full), idx))
    if missing:
        n, path, full = missing[0]
        more = f" ({len(missing)} of {len(samples)} lines name missing files)" if len(missing) > 1 else ""
        rel = "" if Path(path).is_absolute() else f", relative paths are read from {root}"
        raise UserError(f"{labels_file}:{n} names {path}, which does not exist ({full}{rel}){more}")
    if not samples:
        raise UserError(f"labels file {labels_file} lists no images")
    return _spread(samples, limit) if limit else samples


def unlabelled_note(root: str | Path, labels_file: Optional[str | Path],
                    samples: list[Sample]) -> Optional[str]:
    """Why images of `root` have no labels (for eval's note), or None when every image has one."""
    unlabelled = sum(s.label < 0 for s in samples)
    if not unlabelled or labels_file is not None:
        return None
    root = Path(root)
    wnids = set(imagenet_wnids())
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    others = [d for d in subdirs if d not in wnids]
    if others and len(others) < len(subdirs):
        why = (f"{len(others)} of its {len(subdirs)} folders are not ImageNet wnids (e.g. {others[0]!r}), "
               "so no folder is read as a class")
    elif others:
        why = f"its folders are not named by ImageNet wnids (e.g. {others[0]!r})"
    else:
        why = "it has no class folders"
    return (f"no labels: {unlabelled} images of {root} are unlabelled ({why}); name the class folders "
            "by wnid (n01440764/...) or pass --labels FILE for top-1")


def first_decodable(samples: list[Sample]) -> Optional[int]:
    """Index of the first sample that decodes as an image (None: none does). Cheap where the data is
    good (it stops at the first image that decodes), so a folder of nothing but broken files is
    refused before any model is built or any minute is spent."""
    for i, s in enumerate(samples):
        try:
            with Image.open(s.path) as im:
                im.convert("RGB")
        except Exception:  # noqa: BLE001 - truncated, corrupt or not an image at all
            continue
        return i
    return None


def require_decodable(samples: list[Sample], root: str | Path) -> None:
    """One UserError when none of the images decodes (named by how many and what the first is)."""
    if first_decodable(samples) is None:
        first = samples[0].path if samples else ""
        raise UserError(f"none of the {len(samples)} images under {root} could be decoded "
                        f"(e.g. {first}: truncated, corrupt or not an image)")


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
