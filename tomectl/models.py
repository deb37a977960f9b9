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
import re
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


def _reducible(arch: str) -> bool:
    """Whether tomectl reduces timm model `arch`: its family is one the ViT adapter takes and the
    adapter accepts the model's parts (built on the meta device: no memory, no weights)."""
    from timm.models._registry import model_entrypoint

    if model_entrypoint(arch).__module__ not in VIT_MODULES:
        return False
    import timm

    from .adapters.vit import check_supported

    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
        check_supported(model)
    except Exception:  # noqa: BLE001 - refused by the adapter, or not buildable here
        return False
    return True


def suggest(arch: str, by_spelling: bool, n: int = 3) -> list[str]:
    """Up to `n` timm names that tomectl accepts, for a name it refused: the ViT/DeiT names closest
    to `arch` in spelling (`by_spelling`, for a typo), else the DeiT and ViT of the same size
    (tiny, small, base, large; for a model of another family, whose spelling says nothing)."""
    import timm
    from timm.models._registry import model_entrypoint

    if by_spelling:
        vits = [m for m in timm.list_models() if model_entrypoint(m).__module__ in VIT_MODULES]
        cands = difflib.get_close_matches(arch, vits, n=4 * n, cutoff=0.6)
    else:
        size = next((w for w in ("tiny", "small", "base", "large") if w in arch), "small")
        cands = [f"deit_{size}_patch16_224", f"vit_{size}_patch16_224"]
    out: list[str] = []
    for cand in cands:
        if len(out) == n:
            break
        if cand not in out and timm.is_model(cand) and _reducible(cand):
            out.append(cand)
    return out


def check_name(name: str) -> str:
    """Validate a timm model name for the ViT adapter; return its family. One-line errors whose
    suggestions are names tomectl accepts."""
    import timm
    from timm.models import split_model_name_tag
    from timm.models._registry import model_entrypoint

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = suggest(arch, by_spelling=True)
        hint = (f"; did you mean {', '.join(close)}?" if close else
                "; tomectl takes timm ViT and DeiT names such as deit_small_patch16_224")
        raise UserError(f"unknown model {name!r}{hint}")
    module = model_entrypoint(arch).__module__
    if module not in VIT_MODULES:
        family = module.rsplit(".", 1)[-1]
        close = suggest(arch, by_spelling=False)
        hint = f"; of its size, tomectl takes {' and '.join(close)}" if close else ""
        raise UserError(
            f"{name} is a timm '{family}' model, not a ViT tomectl can reduce; supported families: "
            f"DeiT, DeiT-III, ViT (AugReg, MAE, DINOv2, register tokens){hint}"
        )
    return VIT_MODULES[module]


WEIGHTS_EXPECTED = ("a .safetensors file or a PyTorch state dict (.pth/.pt/.bin, "
                    "as torch.save(model.state_dict(), FILE) writes)")


def _weights_format(path: Path) -> str:
    """What the file's first bytes say it is: "safetensors", "torch" (zip or legacy pickle),
    "text" or "unknown"."""
    from .artifact import text_start

    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or its legacy pickle
        return "torch"
    return "text" if text_start(path) is not None else "unknown"


def _torch_load_problem(path: Path, e: Exception) -> str:
    """What a failed torch.load(weights_only=True) means, for a person."""
    msg = str(e)
    if "weights_only" in msg or "Unsupported global" in msg:
        found = re.search(r"Unsupported globals?: (?:GLOBAL )?([\w.]*\w)", msg)
        what = f" ({found.group(1)})" if found else ""
        return (f"it is a pickled checkpoint that holds Python objects besides tensors{what}, which tomectl "
                "does not unpickle; save model.state_dict() (torch.save or safetensors) and pass that")
    if "zip" in msg.lower() or "archive" in msg.lower() or "PytorchStreamReader" in msg:
        return "it is a zip archive but not a complete PyTorch checkpoint (truncated or another kind of zip)"
    return f"it cannot be read as a PyTorch checkpoint (truncated or corrupt: {msg.splitlines()[0][:100]})"


def read_state_dict(path: str | Path) -> dict:
    """The tensors of a weights file (.safetensors, or a PyTorch checkpoint read with
    weights_only=True; a nested ``state_dict`` / ``model`` entry and DDP's ``module.`` prefix are
    unwrapped, as timm does). Every way the file can be wrong is one UserError that says what the
    file is and what was expected."""
    from .artifact import check_input_file, text_start

    path = check_input_file(path, "weights file", WEIGHTS_EXPECTED)

    def refuse(why: str) -> UserError:
        return UserError(f"cannot read weights from {path}: {why}; expected {WEIGHTS_EXPECTED}")

    kind = _weights_format(path)
    if kind == "text":
        raise refuse(f"it is a text file (it starts with {text_start(path)!r})")
    if kind == "unknown":
        raise refuse("it is neither a safetensors file nor a PyTorch checkpoint")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
            raise refuse(f"it starts like a safetensors file but cannot be read "
                         f"(truncated or corrupt: {str(e).splitlines()[0][:100]})") from None
    else:
        try:
            with open(path, "rb") as f:  # a file object: torch.load would go by the name's suffix
                obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated, foreign or object-holding file
            raise UserError(f"cannot read weights from {path}: {_torch_load_problem(path, e)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise refuse(f"it holds a {type(obj).__name__}, not a state dict (parameter names -> tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:3])) or "nothing"
        raise refuse(f"it holds a dict without tensors (keys: {keys}), not a state dict")
    if len(tensors) < len(obj):
        other = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise refuse(f"its entry {other!r} is not a tensor ({type(obj[other]).__name__}); "
                     "a state dict maps parameter names to tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in tensors.items()}


def load_weights_strict(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into `model`; any mismatch is a UserError naming the keys."""
    path = Path(path)
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]

    def few(keys):
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    if len(missing) + len(shapes) >= len(own) / 2:  # not a variant of this model: another one's weights
        fit = len(own) - len(missing) - len(shapes)
        raise UserError(
            f"weights {path.name} are another model's, not {name}'s: {fit} of its {len(own)} tensors are "
            f"in the file with the right shape (the file holds {len(sd)}, e.g. {few(list(sd)[:2])}); "
            f"pass weights saved from {name}"
        )
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
