"""Artifact directories: what `compress` (and later `calibrate`, `train`) write, and how to read them.

    DIR/recipe.yaml    the recipe, resolved: per-layer removals, tokens per layer, weights + sha256
    DIR/summary.json   params, GMACs before/after (analytic and measured), versions
    DIR/learned.safetensors   learned methods (DTEM, PatchMerger, LTM): the trained parameters
    DIR/model.safetensors     after `train --finetune`: the fine-tuned backbone's weights
    DIR/train.json            after `train`: the training log (loss and agreement per epoch)

Writing is atomic: everything goes to a hidden temporary directory beside DIR, which is renamed
into place only when complete, so an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import yaml

from .errors import UserError, read_input
from .recipe import Recipe
from .recipe import load as load_recipe

RECIPE = "recipe.yaml"
SUMMARY = "summary.json"
LEARNED = "learned.safetensors"
MODEL_WEIGHTS = "model.safetensors"
TRAIN_LOG = "train.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries: give outputs the usual umask permissions."""
    mask = _umask()
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `out` that is renamed to `out` only if the block finishes."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def recipe_document(recipe: Recipe, removed, tokens, weights: dict, version: str) -> dict:
    """The artifact's recipe.yaml: the recipe with what it resolved to. The method's options are
    written in full (defaults included), so a later release that changes a default does not
    change what an existing artifact computes."""
    from .reduce import get_method

    d = recipe.to_dict()
    d["options"] = {**d["options"], **get_method(recipe.method, recipe.method_options).options}
    d["weights"] = weights
    d["removed_per_layer"] = list(removed)
    d["tokens_per_layer"] = list(tokens)
    d["tomectl_version"] = version
    return d


def write_yaml(path: Path, doc: dict) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def check_input_file(path: str | Path, what: str, expected: str) -> Path:
    """`path` as an existing, readable, non-empty regular file, or one UserError naming it, what it
    is (`what`: "weights file", "ONNX file"...) and what was `expected`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; expected {expected}")
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if empty:
        raise UserError(f"{what} {path} is empty (0 bytes); expected {expected}")
    return path


def text_start(path: str | Path, n: int = 512) -> Optional[str]:
    """The start of the file's first line where the file begins as text (UTF-8, no NUL), else None:
    so a binary-format reader can say "this is a text file" instead of its parser's complaint."""
    with open(path, "rb") as f:
        head = f.read(n)
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end is still text
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:40] + ("..." if len(line) > 40 else "")


def read_json(path: str | Path, what: str, expected: str = "a JSON object") -> dict:
    """The JSON object in `path` (`what` names the file for people: "summary", "sidecar"...).

    Every way the file can be wrong (missing, a directory, unreadable, not UTF-8, empty, truncated
    or not JSON, JSON that is not an object) is one UserError naming the file and what was expected."""
    path = Path(path)
    where = f"{what} {path}"
    raw = read_input(path, where, expected)
    if not raw.strip():
        raise UserError(f"{where} is empty; expected {expected}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where} is not text (not UTF-8); expected {expected}") from None
    except json.JSONDecodeError as e:
        text = raw.decode("utf-8").strip()
        cut = (" (it stops before its closing brace: truncated?)"
               if text[:1] == "{" and text[-1:] != "}" else "")
        raise UserError(f"{where} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}){cut}; "
                        f"expected {expected}") from None
    if not isinstance(doc, dict):
        kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
            type(doc), "null")
        raise UserError(f"{where} holds a JSON {kind}; expected {expected}")
    return doc


def read(artifact_dir: str | Path) -> tuple[Recipe, dict]:
    d = Path(artifact_dir)
    if not d.is_dir():
        what = "is a file" if d.exists() else "no such directory"
        raise UserError(f"{d} is not an artifact directory ({what})")
    if not (d / RECIPE).is_file():
        raise UserError(f"{d} is not an artifact directory: it has no {RECIPE}")
    summary = {}
    if (d / SUMMARY).exists():
        summary = read_json(d / SUMMARY, "artifact summary",
                            "the JSON object `tomectl compress` writes; recreate the artifact")
    return load_recipe(d / RECIPE), summary


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / RECIPE).is_file()


def save_learned(model, path: str | Path) -> None:
    """Write a reduced model's learned parameters (its learned modules) as safetensors."""
    from safetensors.torch import save_file

    from .reduced import learned_modules

    modules = learned_modules(model)
    if modules is None:
        raise ValueError("this model has no learned reduction parameters")
    save_file({k: v.detach().contiguous().cpu() for k, v in modules.state_dict().items()}, str(path))


def load_learned(model, path: str | Path, sha256: str | None = None) -> None:
    """Load learned parameters into the model's learned modules; a mismatch is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import sha256_of

    path = check_input_file(path, "learned parameters file",
                            "the learned.safetensors that `tomectl train` writes")
    if sha256 and sha256_of(path) != sha256:
        raise UserError(f"learned parameters {path} changed since the artifact was made (sha256 differs)")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        first = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise UserError(f"learned parameters file {path} is not a readable safetensors file "
                        f"(truncated or corrupt: {first}); retrain, or restore the artifact's copy") from None
    from .reduced import learned_modules

    modules = learned_modules(model)
    own = {} if modules is None else modules.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{shapes[0]} has shape {tuple(sd[shapes[0]].shape)}, "
                     f"needs {tuple(own[shapes[0]].shape)}")
        raise UserError(f"learned parameters {path.name} do not fit this model and schedule ({what}); "
                        "were they trained for another model, method or schedule?")
    modules.load_state_dict(sd, strict=True)
