"""tomectl's `tome` against the public reference ToMe semantics (issue 15), image by image.

The reference is the independent, plain implementation in tests/test_tome_reference.py (written
from the description of facebookresearch/ToMe's merge.py and timm patch, run on timm's own blocks
with an explicit softmax). For each schedule:

- top-1 agreement of tomectl with the reference, max |logit difference|, the images differing by
  more than 1e-4 and how many of those are near-ties (some merge decision of the reference had its
  two candidates within 1e-5: the other branch is one rounding away);
- agreement of tomectl (and of the reference) with the unreduced model, with its 95 % interval.

Part 1: DeiT-Tiny with the shared weights on all 1,300 shared val images (squash resize), r = 8,
13, 16 and the ramp (13, inflect -1). Part 2: random-weights DeiT-S and distilled DeiT-Tiny on a
few dozen real val images. `--old-tree DIR` (an extract of an older tomectl, e.g.
`git archive 175559b | tar -x -C DIR`) adds that code's agreement with the unreduced model, run in
a subprocess (part 1 only).

    nice .venv/bin/python benchmarks/tome_reference.py [--limit N] [--json out.json] [--old-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tomectl
from tomectl import data, models
from tomectl.metrics import compare

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))
from test_tome_reference import NEAR_TIE, reference_logits  # noqa: E402

ATOL = 1e-4
SCHEDULES = [{"r": 8}, {"r": 13}, {"r": 16}, {"r": 13, "inflect": -1.0}]


def load_val(limit, preproc) -> tuple[torch.Tensor, torch.Tensor]:
    samples = data.scan(SHARED / "data" / "imagenet-val-1300", limit=limit)
    images, labels = [], []
    for b in data.loader(samples, preproc, "squash", batch_size=100):
        images.append(b.images)
        labels.append(b.labels)
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int):
    outs = [fn(x[i:i + batch]) for i in range(0, len(x), batch)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o) for o in zip(*outs, strict=True))
    return torch.cat(outs)


def describe(s: dict) -> str:
    return f"r={s['r']}" + (f" inflect {s['inflect']:g}" if s.get("inflect") else "")


def measure(model, x, y, schedules, batch: int, base=None) -> list[dict]:
    tomectl.remove(model)
    if base is None:
        base = batched(model, x, batch)
    rows = []
    for s in schedules:
        t0 = time.perf_counter()
        tomectl.apply(model, "tome", **s)
        removed = list(model.tomectl_plan.removed)
        ours = batched(model, x, batch)
        tomectl.remove(model)
        ref, margin = batched(lambda b, rm=removed: reference_logits(model, b, rm), x, batch)
        diff = (ours - ref).abs().amax(dim=-1)
        over = diff > ATOL
        tie = margin < NEAR_TIE
        c_ours, c_ref = compare(base, ours, y), compare(base, ref, y)
        rows.append({
            "schedule": describe(s), "removed": removed, "images": len(x),
            "agree_with_reference": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
            "top1_differs": int((ours.argmax(-1) != ref.argmax(-1)).sum()),
            "max_abs_diff": float(diff.max()), "median_max_abs_diff": float(diff.median()),
            "over_1e-4": int(over.sum()), "over_1e-4_near_tie": int((over & tie).sum()),
            "near_tie_images": int(tie.sum()),
            "max_abs_diff_clear": float(diff[~tie].max()) if (~tie).any() else 0.0,
            "agreement": c_ours.agreement, "agreement_ci95": list(c_ours.agreement_ci95),
            "ref_agreement": c_ref.agreement, "ref_agreement_ci95": list(c_ref.agreement_ci95),
            "top1": c_ours.top1, "ref_top1": c_ref.top1, "seconds": round(time.perf_counter() - t0, 1),
        })
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    lo, hi = row["agreement_ci95"]
    print(f"  {row['schedule']:<16} vs ref: top-1 {row['agree_with_reference']:.2%} "
          f"({row['top1_differs']} differ), max|d| {row['max_abs_diff']:.2e}, "
          f">1e-4: {row['over_1e-4']} ({row['over_1e-4_near_tie']} near-ties; "
          f"{row['near_tie_images']} near-tie images in all), clear max|d| {row['max_abs_diff_clear']:.1e}"
          f" | vs unreduced: tomectl {row['agreement']:.2%} [{lo:.1%}, {hi:.1%}], "
          f"reference {row['ref_agreement']:.2%}  ({row['seconds']} s)", flush=True)


OLD_SNIPPET = """
import sys, torch, tomectl
from tomectl import models
model = models.create("deit_tiny_patch16_224", weights=sys.argv[1]).model
x = torch.load(sys.argv[2])
out = {}
for r in (8, 13, 16):
    tomectl.apply(model, r=r)
    with torch.no_grad():
        out[r] = torch.cat([model(x[i:i + 50]) for i in range(0, len(x), 50)])
torch.save(out, sys.argv[3])
"""


def old_tree_agreement(tree: Path, weights: Path, x, base, y) -> list[dict]:
    """The older code's agreement with the unreduced model (constant r), in a subprocess."""
    with tempfile.TemporaryDirectory() as td:
        xin, xout = Path(td) / "x.pt", Path(td) / "out.pt"
        torch.save(x, xin)
        env = dict(os.environ, PYTHONPATH=str(tree))
        subprocess.run([sys.executable, "-c", OLD_SNIPPET, str(weights), str(xin), str(xout)], env=env,
                       check=True, cwd=td)
        out = torch.load(xout)
    rows = []
    for r, logits in out.items():
        c = compare(base, logits, y)
        rows.append({"schedule": f"r={r}", "agreement": c.agreement, "agreement_ci95": list(c.agreement_ci95),
                     "top1": c.top1})
        lo, hi = c.agreement_ci95
        print(f"  old partition r={r}: agreement {c.agreement:.2%} [{lo:.1%}, {hi:.1%}], top-1 {c.top1:.1%}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--random-images", type=int, default=48, help="images for the random-weights models")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--old-tree", default=None)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    weights = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    if not weights.is_file() or not (SHARED / "data" / "imagenet-val-1300").is_dir():
        print(f"skipped: needs {weights} and the shared val images", file=sys.stderr)
        return 0
    report: dict = {}
    model = models.create("deit_tiny_patch16_224", weights=weights).model.eval()
    pre = models.preprocessing(model)
    if not args.skip_real:
        x, y = load_val(args.limit, pre)
        print(f"DeiT-Tiny (shared weights), {len(x)} shared val images, squash resize", flush=True)
        with torch.no_grad():
            base = batched(model, x, args.batch)
        report["deit_tiny_shared"] = measure(model, x, y, SCHEDULES, args.batch, base)
        if args.old_tree:
            report["deit_tiny_shared_old_partition"] = old_tree_agreement(Path(args.old_tree), weights, x,
                                                                          base, y)
    xs, ys = load_val(args.random_images, pre)
    for name in ("deit_small_patch16_224", "deit_tiny_distilled_patch16_224"):
        torch.manual_seed(0)
        m = models.create(name, random_weights=True).model.eval()
        print(f"{name} (random weights), {len(xs)} val images", flush=True)
        report[name + "_random"] = measure(m, xs, ys, SCHEDULES, args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
