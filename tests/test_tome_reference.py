"""tomectl's `tome` against the public reference ToMe (facebookresearch/ToMe), on timm's own blocks.

`reference_logits` below is an independent, deliberately plain implementation of what the
reference computes (its `tome/merge.py` bipartite_soft_matching + merge_wavg and its timm patch),
written from that description, not from tomectl's code:

- in every block, after the attention residual: keys averaged over heads, L2-normalised;
- A = tokens at even positions, B = odd positions, *all* tokens; the class token's score row
  (A, position 0) and a distillation token's score column (B, position 1) are -inf;
- each A token's best B token; the r best edges merge; the unmerged A indices are sorted (when
  there is a class token) so the class token stays first; output [unmerged A, B], with the
  distillation token moved back to position 1;
- merge_wavg: ``scatter_reduce(sum)`` of ``size * x`` and of ``size``, then divide;
- proportional attention: ``softmax(q k^T * scale + log size)``, written out (no fused kernel);
- r capped at ``(N - protected) // 2`` at every block.

Register tokens are not in the reference; the same rule generalised (every prefix token is
protected: its row or column is -inf, and all prefix tokens stay leading, in order) is checked on a
small register-token ViT.

Images whose reference decisions hinge on a near-tie (a merge decision whose two candidates score
within `NEAR_TIE` of each other) may legitimately take the other branch from rounding alone; they
are counted and must stay a small minority, every other image must match within `ATOL`.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

import tomectl

ATOL = 1e-4
NEAR_TIE = 1e-5


def reference_parse_r(n_layers: int, r: int, inflect: float = 0.0) -> list[int]:
    """The reference's schedule (r, inflect): a line from int(r (1 - inflect)) to its mirror image
    around r, truncated to whole tokens layer by layer."""
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    step = (last - first) / (n_layers - 1)
    return [int(first + step * i) for i in range(n_layers)]


def _attention(attn, h: torch.Tensor, size):
    """timm Attention written out: explicit softmax with the log-size bias. Returns (output, keys
    averaged over heads)."""
    b, n, c = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + torch.log(size)[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    return attn.proj(attn.norm(out)), k.mean(dim=1)


def _reference_merge(x, size, keys, r: int, prefix: int, margins: list):
    """One reference merge step on [B, N, C] tokens; `prefix` leading tokens protected (1: class
    token, 2: class + distillation token, more: registers too, the generalisation)."""
    n = x.shape[1]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    a_feat, b_feat = unit[:, 0::2], unit[:, 1::2]
    scores = a_feat @ b_feat.transpose(-1, -2)
    n_a, n_b = scores.shape[1:]
    a_prefix = (prefix + 1) // 2  # prefix tokens at even positions 0, 2, ...: the first rows of A
    b_prefix = prefix // 2  # prefix tokens at odd positions 1, 3, ...: the first columns of B
    scores[:, :a_prefix, :] = -math.inf
    scores[:, :, :b_prefix] = -math.inf
    best, partner = scores.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True, stable=True)
    src, unm = edges[:, :r], edges[:, r:]
    if prefix > 0:
        unm = unm.sort(dim=-1).values
    dst = partner.gather(1, src)

    # how close each decision came to going the other way (for the near-tie count)
    ranked = best.gather(1, edges)
    no_rival = torch.full_like(ranked[:, 0], math.inf)
    boundary = ranked[:, r - 1] - ranked[:, r] if r < n_a - a_prefix else no_rival
    top2 = scores.gather(1, src[..., None].expand(-1, -1, n_b)).topk(min(2, n_b - b_prefix), dim=-1).values
    second = (top2[..., 0] - top2[..., 1]).amin(dim=-1) if top2.shape[-1] > 1 else no_rival
    margins.append(torch.minimum(boundary, second))

    def merge_sum(t):
        c = t.shape[-1]
        t_a, t_b = t[:, 0::2], t[:, 1::2]
        kept = t_a.gather(1, unm[..., None].expand(-1, -1, c))
        moved = t_a.gather(1, src[..., None].expand(-1, -1, c))
        t_b = t_b.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce="sum")
        # prefix tokens back in front, in position order (they are the first of kept / of t_b)
        lead = [None] * prefix
        for i in range(prefix):
            lead[i] = kept[:, i // 2 : i // 2 + 1] if i % 2 == 0 else t_b[:, i // 2 : i // 2 + 1]
        return torch.cat(lead + [kept[:, a_prefix:], t_b[:, b_prefix:]], dim=1)

    if size is None:
        size = torch.ones_like(x[..., :1])
    total = merge_sum(size)
    out = merge_sum(x * size) / total
    assert out.shape[1] == n - r
    return out, total


@torch.no_grad()
def reference_logits(model, images: torch.Tensor, removed, prop_attn: bool = True):
    """The reference ToMe forward pass of a plain (unpatched) timm ViT. Returns (logits [B, K],
    smallest decision margin per image [B])."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size, margins = None, []
    for blk, r in zip(model.blocks, removed, strict=True):
        out, keys = _attention(blk.attn, blk.norm1(x), size if prop_attn else None)
        x = x + blk.ls1(out)
        r = min(r, (x.shape[1] - prefix) // 2)
        if r > 0:
            x, size = _reference_merge(x, size, keys, r, prefix, margins)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg" and size is not None:  # size-weighted average pool over patches
        s = size[:, prefix:]
        pooled = (x[:, prefix:] * s).sum(dim=1) / s.sum(dim=1)
        logits = model.head(model.fc_norm(pooled))
    else:
        logits = model.forward_head(x)
    margin = torch.stack(margins, dim=1).amin(dim=1) if margins else torch.full((len(images),), math.inf)
    return logits, margin


def _model(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(n: int, size: int = 224, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.randn(n, 3, 14, 14, generator=g), size=size,
                                             mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(n, 3, size, size, generator=g)


def _check(model, images, **schedule) -> dict:
    with torch.no_grad():
        tomectl.apply(model, "tome", **schedule)
        removed = list(model.tomectl_plan.removed)
        ours = model(images)
        tomectl.remove(model)
    ref, margin = reference_logits(model, images, removed)
    diff = (ours - ref).abs().amax(dim=-1)
    tie = margin < NEAR_TIE
    bad = (diff > ATOL) & ~tie
    assert not bad.any(), f"max |diff| {diff[bad].max():.2e} on {int(bad.sum())} images with clear decisions"
    assert int(tie.sum()) <= max(1, len(images) // 4), f"{int(tie.sum())} near-tie images of {len(images)}"
    assert (ours.argmax(-1) == ref.argmax(-1))[~tie].all()
    print(f"max |diff| {float(diff[~tie].max()):.2e}, near-ties {int(tie.sum())}, "
          f"smallest margin {float(margin.min()):.1e}")
    return {"max_diff": float(diff[~tie].max()), "ties": int(tie.sum()), "removed": removed}


@pytest.fixture(scope="module")
def images():
    return _images(8)


@pytest.fixture(scope="module")
def deit_tiny():
    return _model("deit_tiny_patch16_224")


@pytest.mark.parametrize("schedule", [{"r": 4}, {"r": 13}, {"r": 16}, {"r": 13, "inflect": -1.0},
                                      {"r": 8, "inflect": 0.5}])
def test_tome_equals_the_reference_deit_tiny(deit_tiny, images, schedule):
    res = _check(deit_tiny, images, **schedule)
    assert res["max_diff"] < ATOL


@pytest.mark.parametrize("schedule", [{"r": 13}, {"r": 16, "inflect": -1.0}])
def test_tome_equals_the_reference_distilled_deit(images, schedule):
    """Class token at 0 (in A) and distillation token at 1 (in B): the patch tokens start with A."""
    model = _model("deit_tiny_distilled_patch16_224")
    assert model.num_prefix_tokens == 2
    _check(model, images, **schedule)


def test_tome_equals_the_reference_at_the_reference_ramp(deit_tiny, images):
    """The reference's own (r, inflect) rounding, given as an explicit per-layer schedule; tomectl's
    `inflect` schedule gives the same counts."""
    from tomectl.schedule import Schedule, layer_counts

    per_layer = reference_parse_r(12, 13, -1.0)
    assert per_layer[:3] == [26, 23, 21] and per_layer[-1] == 0
    for r, inflect in ((13, -1.0), (8, 0.5), (16, -0.5), (5, 1.0)):
        assert layer_counts(Schedule(r=r, inflect=inflect), 12, 197, 1) == reference_parse_r(12, r, inflect)
    res = _check(deit_tiny, images, per_layer=per_layer)
    assert res["removed"] == per_layer


@pytest.mark.parametrize("class_token,reg_tokens", [(True, 4), (False, 4), (True, 3), (False, 0)])
def test_prefix_tokens_generalise_the_reference_rule(class_token, reg_tokens):
    """Registers (and no prefix at all): every prefix token is protected and stays leading, in
    order; with no prefix token at all nothing is sorted, as in the reference without a class token."""
    kwargs = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10,
                  class_token=class_token, reg_tokens=reg_tokens,
                  global_pool="token" if class_token else "avg")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    assert model.num_prefix_tokens == int(class_token) + reg_tokens
    _check(model, _images(4, size=64, seed=2), r=9)
