"""Artifact directories: what `compress` (and later `calibrate`, `train`) write, and how to read them.

    DIR/recipe.yaml    the recipe, resolved: per-layer removals, tokens per layer, weights + sha256
    DIR/summary.json   params, GMACs before/after (analytic and measured), versions

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
from typing import Iterator

import yaml

from .errors import UserError
from .recipe import Recipe
from .recipe import load as load_recipe

RECIPE = "recipe.yaml"
SUMMARY = "summary.json"


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
    d = recipe.to_dict()
    d["weights"] = weights
    d["removed_per_layer"] = list(removed)
    d["tokens_per_layer"] = list(tokens)
    d["tomectl_version"] = version
    return d


def write_yaml(path: Path, doc: dict) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def read(artifact_dir: str | Path) -> tuple[Recipe, dict]:
    d = Path(artifact_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not an artifact directory (no such directory)")
    if not (d / RECIPE).is_file():
        raise UserError(f"{d} is not an artifact directory: it has no {RECIPE}")
    summary = {}
    if (d / SUMMARY).is_file():
        summary = json.loads((d / SUMMARY).read_text())
    return load_recipe(d / RECIPE), summary


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / RECIPE).is_file()
