"""Which patches each final token holds: the picture behind `tomectl visualize`.

The reduced model runs once on the image with source tracking on (`TokenState.source`, [B, N, N0]:
which original tokens each token holds). Every patch then belongs to exactly one final token, or
to none when a pruning method dropped it. The picture has two panels at the model's input
resolution (what the model saw, after resize/crop):

- left: the image with the outline of every final token's patch group;
- right: each group filled with its mean colour (ToMe's way of showing what the model keeps),
  dropped patches dark grey.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifact import atomic_file
from .build import build
from .errors import UserError
from .recipe import Recipe

SCALE = 2  # output pixels per input pixel


@dataclass
class TokenMap:
    """What `visualize` drew."""

    image: str
    out: str
    model: str
    method: str
    schedule: str
    grid: tuple[int, int]  # patches (rows, cols)
    tokens_per_layer: list[int]
    final_tokens: int  # unprotected tokens after the last block
    patches_dropped: int  # patches held by no final token (pruned)
    largest_group: int  # patches held by the biggest final token
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["grid"] = list(self.grid)
        return d


def patch_owners(source: torch.Tensor, protected: int) -> torch.Tensor:
    """[N_L, N0] source of one image -> [N0 - protected] index of the final token holding each patch
    (counted among the unprotected final tokens), -1 where no token holds it."""
    patches = source[protected:, protected:]  # final unprotected tokens x patches
    held, owner = patches.max(dim=0)
    return torch.where(held > 0, owner, torch.full_like(owner, -1))


def load_image(path: str | Path, preproc: dict, resize: str) -> tuple[torch.Tensor, np.ndarray]:
    """The model's input [1, 3, H, W] and the same picture as uint8 RGB [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    from .data import make_transform

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            x = make_transform(preproc, resize)(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} could not be read as an image ({e.__class__.__name__})") from None
    mean = torch.tensor(preproc["mean"]).view(3, 1, 1)
    std = torch.tensor(preproc["std"]).view(3, 1, 1)
    rgb = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return x[None], rgb


def _palette(n: int) -> np.ndarray:
    """n distinct, stable colours (golden-ratio hues)."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)]
                     for i in range(max(n, 1))], dtype=np.uint8)


def draw(rgb: np.ndarray, owners: np.ndarray, grid: tuple[int, int]):
    """Two panels side by side (a PIL image): outlines over the image, and the groups' mean colours."""
    from PIL import Image

    gh, gw = grid
    h, w, _ = rgb.shape
    ph, pw = h // gh, w // gw
    owner_px = np.kron(owners.reshape(gh, gw), np.ones((ph, pw), dtype=owners.dtype))  # [gh*ph, gw*pw]
    img = rgb[: gh * ph, : gw * pw].astype(np.float32)

    mosaic = np.full_like(img, 48.0)  # dropped patches: dark grey
    for t in np.unique(owner_px[owner_px >= 0]):
        sel = owner_px == t
        mosaic[sel] = img[sel].mean(axis=0)

    big = lambda a: np.kron(a, np.ones((SCALE, SCALE, 1) if a.ndim == 3 else (SCALE, SCALE), dtype=a.dtype))  # noqa: E731
    own, left, right = big(owner_px), big(img), big(mosaic)
    edge = np.zeros(own.shape, dtype=bool)
    edge[:-1, :] |= own[:-1, :] != own[1:, :]
    edge[:, :-1] |= own[:, :-1] != own[:, 1:]
    colours = _palette(int(owners.max()) + 1)
    outline = np.where((own >= 0)[..., None], colours[np.clip(own, 0, None)], 255).astype(np.float32)
    left[edge] = outline[edge]
    left[own < 0] = left[own < 0] * 0.35  # dropped patches dimmed on the left too
    right[edge] = 0.5 * right[edge] + 0.5 * outline[edge]
    gap = np.full((left.shape[0], 8, 3), 255.0, dtype=np.float32)
    return Image.fromarray(np.concatenate([left, gap, right], axis=1).round().astype(np.uint8))


def visualize(recipe: Recipe, image: str | Path, out: str | Path, weights=None, random_weights: bool = False,
              resize: str = "timm") -> TokenMap:
    """Run the reduced model of `recipe` on `image` and write the token map PNG to `out`."""
    from .models import preprocessing

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {out}")
    built = build(recipe, weights=weights, random_weights=random_weights, track_source=True)
    model = built.model
    x, rgb = load_image(image, preprocessing(model), resize)
    with torch.inference_mode():
        _, state = model.forward_tokens(x)
    protected = state.protected
    owners = patch_owners(state.source[0], protected).numpy()
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    if owners.size != grid[0] * grid[1]:
        raise UserError(f"model has {owners.size} patches, not a {grid[0]}x{grid[1]} grid; cannot draw it")
    picture = draw(rgb, owners, grid)
    with atomic_file(out) as tmp:
        picture.save(tmp, format="PNG")
    held = owners[owners >= 0]
    return TokenMap(
        image=str(image), out=str(out), model=recipe.model, method=recipe.method,
        schedule=recipe.schedule.describe(), grid=grid, tokens_per_layer=built.tokens,
        final_tokens=built.tokens[-1] - protected, patches_dropped=int((owners < 0).sum()),
        largest_group=int(np.bincount(held).max()) if held.size else 0, options=dict(recipe.method_options),
    )
