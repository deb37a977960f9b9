"""ToMe off the shelf on DeiT-Tiny (shared real weights) over all 1,300 shared val images.

Prints top-1, agreement with the unreduced model (with its 95 % Wilson interval), flips, KL and
GMACs (analytic and measured) for r = 0, 8, 13, 16, all measured in one run on the same images.

    .venv/bin/python benchmarks/tome_accuracy.py [--r 0,8,13,16] [--limit N] [--json out.json]

Reference point (METHODS.md): the public reference ToMe patch, off the shelf, agrees on 93.3 % at
r=13 on these images (0.735 of 1.254 GMACs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import tomectl
from tomectl import data, models
from tomectl.adapters import vit
from tomectl.flops import analytic_macs, measured_macs
from tomectl.metrics import compare
from tomectl.reduce import get_method

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", default="0,8,13,16")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    weights = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    val = SHARED / "data" / "imagenet-val-1300"
    if not weights.is_file() or not val.is_dir():
        print(f"skipped: needs {weights} and {val}", file=sys.stderr)
        return 0
    model = models.create("deit_tiny_patch16_224", weights=weights).model
    pre = models.preprocessing(model)
    samples = data.scan(val, limit=args.limit)
    images, labels = [], []
    for b in data.loader(samples, pre, "squash", batch_size=100):
        images.append(b.images)
        labels.append(b.labels)
    x, y = torch.cat(images), torch.cat(labels)
    rs = [int(v) for v in args.r.split(",")]
    if 0 not in rs:
        rs = [0] + rs
    rows, logits = [], {}
    dims = vit.dims(model)
    for r in rs:
        tomectl.apply(model, r=r)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits[r] = torch.cat([model(x[i:i + args.batch]) for i in range(0, len(x), args.batch)])
        secs = time.perf_counter() - t0
        c = compare(logits[0], logits[r], y)
        rows.append({
            "r": r, "tokens_final": 197 - sum(model.tomectl_plan.removed),
            "gmacs": analytic_macs(dims, model.tomectl_plan.removed, get_method("tome")).gmacs,
            "gmacs_measured": measured_macs(model, pre["input_size"]) / 1e9,
            "top1": c.top1, "top5": c.top5, "agreement": c.agreement, "agreement_ci95": c.agreement_ci95,
            "flips_right_to_wrong": c.flips_right_to_wrong, "flips_wrong_to_right": c.flips_wrong_to_right,
            "kl": c.kl, "seconds": secs,
        })
    print(f"DeiT-Tiny (shared weights), {len(x)} shared val images, squash resize, ToMe off the shelf")
    print(f"{'r':>3} {'GMACs':>6} {'meas.':>6} {'ratio':>6} {'top-1':>6} {'top-5':>6} {'agree':>6} "
          f"{'95% CI':>13} {'R->W':>5} {'W->R':>5} {'KL':>6}")
    base = rows[0]
    for row in rows:
        lo, hi = row["agreement_ci95"]
        print(f"{row['r']:>3} {row['gmacs']:6.3f} {row['gmacs_measured']:6.3f} "
              f"{row['gmacs'] / base['gmacs']:6.3f} "
              f"{row['top1']:6.1%} {row['top5']:6.1%} {row['agreement']:6.1%} {lo:6.1%}-{hi:6.1%} "
              f"{row['flips_right_to_wrong']:>5} {row['flips_wrong_to_right']:>5} {row['kl']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
