"""Model loading: any timm ViT by name, with weights from a file, a folder or timm's hub.

Where weights come from, in order:
1. ``weights=FILE`` (.safetensors or .pth/.pt/.bin), loaded strictly: a mismatch names the
   missing, unexpected or mis-shaped keys;
2. ``$TOMECTL_WEIGHTS_DIR/<name>.safetensors`` (also tried without the ``.tag``), when present;
3. timm's hub download or cache;
or ``random_weights=True``: timm's own initialisation with a fixed seed, for speed work only.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UserError

# timm module -> family name shown to users, for the modules whose models the ViT adapter takes
VIT_MODULES = {
    "timm.models.vision_transformer": "ViT",
    "timm.models.deit": "DeiT",
}
RANDOM_SEED = 0
WEIGHTS_ENV = "TOMECTL_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "file" | "dir" | "hub" | "random"
    path: Optional[str] = None
    sha256: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    weights: WeightsInfo

    @property
    def random_weights(self) -> bool:
        return self.weights.source == "random"


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_name(name: str) -> str:
    """Validate a timm model name for the ViT adapter; return its family. One-line errors."""
    import timm
    from timm.models import split_model_name_tag
    from timm.models._registry import model_entrypoint

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*vit*')` lists them"
        raise UserError(f"unknown model {name!r}{hint}")
    module = model_entrypoint(arch).__module__
    if module not in VIT_MODULES:
        family = module.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(arch, [m for m in timm.list_models() if "vit" in m or "deit" in m],
                                          n=3)
        hint = f" (close ViTs: {', '.join(close)})" if close else ""
        raise UserError(
            f"{name} is a timm '{family}' model, not a ViT tomectl can reduce; supported families: "
            f"DeiT, DeiT-III, ViT (AugReg, MAE, DINOv2, register tokens){hint}"
        )
    return VIT_MODULES[module]


def _read_state_dict(path: Path) -> dict:
    from timm.models import load_state_dict  # handles .safetensors/.pth and nested 'model' keys

    try:
        return load_state_dict(str(path), use_ema=False)
    except Exception as e:  # a corrupt or foreign file
        raise UserError(f"cannot read weights from {path}: {str(e).splitlines()[0]}") from None


def load_weights_strict(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into `model`; any mismatch is a UserError naming the keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    sd = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]

    def few(keys):
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if shapes:
        k = shapes[0]
        problems.append(
            f"shape mismatch {few(shapes)} (e.g. {k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        )
    if problems:
        raise UserError(f"weights {path.name} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached_file(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for fname in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, fname)
        if isinstance(hit, str):
            return hit
    return None


def create(
    name: str,
    weights: Optional[str | Path] = None,
    random_weights: bool = False,
    weights_dir: Optional[str | Path] = None,
    **model_kwargs,
) -> LoadedModel:
    """Build timm model `name` in eval mode with weights resolved as the module docstring says."""
    import timm

    check_name(name)
    if weights is not None and random_weights:
        raise UserError("give either --weights or --random-weights, not both")
    torch.manual_seed(RANDOM_SEED)
    try:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    except TypeError as e:
        raise UserError(f"cannot build {name} with {model_kwargs}: {e}") from None
    model.eval()

    if random_weights:
        return LoadedModel(model, name, WeightsInfo("random"))
    if weights is not None:
        load_weights_strict(model, weights)
        p = Path(weights).resolve()
        return LoadedModel(model, name, WeightsInfo("file", str(p), sha256_of(p)))

    wdir = weights_dir or os.environ.get(WEIGHTS_ENV)
    if wdir:
        from timm.models import split_model_name_tag

        for stem in dict.fromkeys([name, split_model_name_tag(name)[0]]):
            cand = Path(wdir) / f"{stem}.safetensors"
            if cand.is_file():
                load_weights_strict(model, cand)
                p = cand.resolve()
                return LoadedModel(model, name, WeightsInfo("dir", str(p), sha256_of(p)))

    cached = _hub_cached_file(model)
    if cached is None and not _hub_reachable():
        raise UserError(
            f"no weights for {name}: the timm hub is unreachable and nothing is cached; pass "
            f"--weights FILE (.safetensors/.pth), set {WEIGHTS_ENV}, or use --random-weights for speed work"
        )
    try:
        overlay = {"file": cached} if cached else None
        hub_model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except Exception as e:
        raise UserError(
            f"could not get pretrained weights for {name} from the timm hub "
            f"({str(e).splitlines()[0][:120]}); "
            f"pass --weights FILE or --random-weights"
        ) from None
    hub_model.eval()
    cfg = hub_model.pretrained_cfg or {}
    src = cached or cfg.get("hf_hub_id") or cfg.get("url")
    return LoadedModel(hub_model, name,
                       WeightsInfo("hub", str(src) if src else None, sha256_of(cached) if cached else None))


def preprocessing(model: nn.Module) -> dict:
    """The input a model expects (timm's data config): size, mean, std, interpolation, crop."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "input_size": list(cfg["input_size"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": cfg["interpolation"],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
