"""Calibration goal check: FLOPs budget 0.6 on DeiT-Tiny (shared weights).

Calibrates on 256 shared *training* images, then measures on all 1,300 shared *validation*
images the chosen schedule's agreement with the unreduced model, side by side with constant-r
ToMe at equal or higher GMACs (the constant r whose GMACs are the lowest that are still >= the
chosen schedule's). Also reports how long the calibration took.

    .venv/bin/python benchmarks/calibrate.py [--flops 0.6] [--n-images 256] [--method tome,tofu,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import tomectl
from tomectl import calibrate as cal
from tomectl import data, models
from tomectl.evaluate import predict
from tomectl.metrics import compare

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--method", default=None)
    ap.add_argument("--search-evals", type=int, default=12)
    args = ap.parse_args()
    weights = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    train, val = SHARED / "data" / "imagenet-train-1000", SHARED / "data" / "imagenet-val-1300"
    if not (weights.is_file() and train.is_dir() and val.is_dir()):
        print(f"skipped: needs {weights}, {train} and {val}", file=sys.stderr)
        return 0

    t0 = time.perf_counter()
    res = cal.calibrate("deit_tiny_patch16_224", cal.Budget("flops", args.flops), images=train,
                        n_images=args.n_images, weights=weights,
                        methods=args.method.split(",") if args.method else None,
                        search_evals=args.search_evals)
    secs = time.perf_counter() - t0
    c = res.chosen
    print(f"calibration: {len(res.candidates)} candidates on {res.n_images} train images in {secs:.0f} s")
    print(f"chosen: {c.method} {c.family} {list(c.removed)} {c.gmacs:.3f} GMACs "
          f"({c.gmacs / res.base_gmacs:.3f}), calib agreement {c.agreement:.1%}, KL {c.kl:.4f}")

    model = models.create("deit_tiny_patch16_224", weights=weights).model
    pre = models.preprocessing(model)
    x = torch.cat([b.images for b in data.loader(data.scan(val), pre, "squash", batch_size=100)])
    labels = torch.tensor([s.label for s in data.scan(val)])
    ref = predict(model, x)
    space = cal._space_for(model, ["tome"], {})
    const_r = max(r for r in range(0, 99) if space.gmacs("tome", space.clamp("tome", [r] * 12)) >= c.gmacs)
    rows = []
    for name, method, removed in [
        (f"calibrated ({c.method} {c.family})", c.method, list(c.removed)),
        (f"ToMe constant r={const_r}", "tome", list(space.clamp("tome", [const_r] * 12))),
        (f"ToMe constant r={const_r + 1}", "tome", list(space.clamp("tome", [const_r + 1] * 12))),
    ]:
        tomectl.apply(model, method, per_layer=removed)
        cmp = compare(ref, predict(model, x), labels)
        rows.append((name, cal._space_for(model, [method], {}).gmacs(method, removed), cmp))
    print(f"\nall {len(x)} shared val images, squash resize; "
          f"budget {args.flops} x {res.base_gmacs:.3f} GMACs")
    print(f"{'schedule':34s} {'GMACs':>6} {'ratio':>6} {'agree':>6} {'95% CI':>13} {'KL':>6} {'top-1':>6}")
    for name, g, cmp in rows:
        lo, hi = cmp.agreement_ci95
        print(f"{name:34s} {g:6.3f} {g / res.base_gmacs:6.3f} {cmp.agreement:6.1%} {lo:6.1%}-{hi:6.1%} "
              f"{cmp.kl:6.3f} {cmp.top1:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
