"""Do PyTorch and onnxruntime take the same merge decisions? (issue 15, item 4)

Runs an artifact's reduced model in PyTorch (the formulation the ONNX graph was exported with,
fixed batches of the graph's size, the last one padded as the export check pads it) and its
exported ONNX graph in onnxruntime on the shared val images, and counts the images whose logits
differ by more than 1e-4 and 1e-2, the top-1 disagreements, and how many of the >1e-4 images the
export check's near-tie rule explains (as `tomectl.export.onnx.near_tie_reference`: PyTorch on a
rounding-sized perturbation of the image lands within 1e-4 of onnxruntime).

    nice .venv/bin/python benchmarks/backend_ties.py ARTIFACT GRAPH.onnx [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import tomectl
from tomectl import data, models

SHARED = Path(__file__).resolve().parents[2] / "shared"


def logits_torch(model, images: torch.Tensor, batch: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            real = len(chunk)
            if real < batch:
                chunk = torch.cat([chunk, chunk[:1].expand(batch - real, *chunk.shape[1:])])
            out.append(model(chunk).float().numpy()[:real])
    return np.concatenate(out)


def logits_ort(path: Path, images: torch.Tensor, batch: int) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        real = len(chunk)
        if real < batch:
            chunk = torch.cat([chunk, chunk[:1].expand(batch - real, *chunk.shape[1:])])
        out.append(sess.run(None, {name: chunk.numpy()})[0][:real])
    return np.concatenate(out)


@torch.no_grad()
def near_ties(model, images: torch.Tensor, target: np.ndarray, eps: float = 1e-6, tries: int = 16) -> int:
    """How many of `images` the export check's near-tie rule explains: PyTorch on one of `tries`
    copies perturbed by rounding-sized noise (`eps` relative) lands within 1e-4 of `target` with
    the same top-1 (the rule of `tomectl.export.onnx.near_tie_reference`, restated here)."""
    gen, explained = torch.Generator().manual_seed(0), 0
    for x, t in zip(images, target, strict=True):
        noisy = x[None] + eps * torch.randn((tries, *x.shape), generator=gen) * x.abs().amax().clamp(min=1.0)
        outs = model(noisy).float().numpy()
        ok = (np.abs(outs - t).max(-1) <= 1e-4) & (outs.argmax(-1) == t.argmax())
        explained += bool(ok.any())
    return explained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("graph")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-near-ties", action="store_true", help="skip the near-tie count (slow)")
    args = ap.parse_args()
    val = SHARED / "data" / "imagenet-val-1300"
    side = json.loads(Path(args.graph + ".json").read_text())
    batch = int(side["batch"])
    reduction = side.get("reduction") or {}
    formulation = reduction.get("formulation", "onehot")
    model = tomectl.load(args.artifact)
    plan = model.tomectl_plan
    tomectl.apply(model, plan.method, per_layer=list(plan.removed), prop_attn=plan.prop_attn,
                  formulation=formulation, options=dict(plan.options))
    model.eval()
    pre = models.preprocessing(model)
    samples = data.scan(val, limit=args.limit)
    images = torch.cat([b.images for b in data.loader(samples, pre, "squash", batch_size=100)])
    ref = logits_torch(model, images, batch)
    got = logits_ort(Path(args.graph), images, batch)
    diff = np.abs(ref - got).max(-1)
    over4 = diff > 1e-4
    res = {
        "artifact": args.artifact, "graph": args.graph, "method": plan.method, "removed": list(plan.removed),
        "formulation": formulation, "batch": batch, "images": len(images),
        "over_1e-4": int(over4.sum()), "over_1e-2": int((diff > 1e-2).sum()),
        "top1_differs": int((ref.argmax(-1) != got.argmax(-1)).sum()), "max_abs_diff": float(diff.max()),
        "worst": [int(i) for i in np.argsort(-diff)[:10] if diff[i] > 1e-4],
    }
    print(json.dumps(res), flush=True)
    if not args.no_near_ties and over4.any():
        idx = np.flatnonzero(over4)
        res["over_1e-4_near_tie"] = near_ties(model, images[idx], got[idx])
        print(json.dumps({"over_1e-4_near_tie": res["over_1e-4_near_tie"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
