"""Learned merging (DTEM, PatchMerger, LTM) against ToMe at matched GMACs, DeiT-Tiny (shared weights).

Issue 7's goal: trained on the 1,000 shared *training* images only, evaluated on all 1,300 shared
val images (squash resize), DTEM at r=13 agrees with the unreduced model more often than ToMe at
r=13 (same GMACs within 1 %). PatchMerger and LTM at matched GMACs in the same table.

Each learned method is trained with `tomectl.train.train` (the code behind `tomectl train`: frozen
backbone, distillation from the unreduced model, timm augmentation, AdamW, cosine schedule), with
the val images measured after every epoch (hard, eval-mode decisions: what `tomectl eval` and the
exported graph compute), which gives the agreement curve. Schedules:

- tome:        r = 13 at every block (the baseline);
- dtem:        r = 13 (trained so), and `dtem (matched)`: the same trained embeddings with one
               more token removed at the first few blocks, the fewest that bring its GMACs
               (embedding included) to or below ToMe r=13's; DTEM's embeddings do not depend on the
               schedule;
- patchmerger: one merger at block `--pm-layer` (default 3), M chosen so GMACs are closest to
               ToMe r=13's, at or below it;
- ltm:         the `keep` schedule closest to ToMe r=13's GMACs, at or below (its mask modules and
               dense merge cost more than ToMe's matching, so it removes a little more).

Also printed: a paired comparison of each method with ToMe on the same images (images only one of
the two gets right, an exact two-sided McNemar / sign test), since the two agreements share most
of their noise. Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (agreement per epoch).

    .venv/bin/python benchmarks/learned.py [--epochs 10] [--methods dtem,patchmerger,ltm]
        [--train-limit N] [--val-limit N] [--runs runs/learned [--reuse]] [--out benchmarks/results/learned]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import tomectl
from tomectl import data, models
from tomectl import train as train_mod
from tomectl.adapters import vit
from tomectl.artifact import atomic_file
from tomectl.errors import UserError
from tomectl.evaluate import predict, reduction_off
from tomectl.flops import analytic_macs
from tomectl.metrics import compare
from tomectl.recipe import Recipe
from tomectl.reduce import get_method
from tomectl.schedule import Schedule, resolve

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = "deit_tiny_patch16_224"
R = 13
LEARNED = ("dtem", "patchmerger", "ltm")


def gmacs(model, method: str, removed, options=None) -> float:
    return analytic_macs(vit.dims(model), removed, get_method(method, options)).total / 1e9


def keep_schedule_at_most(model, method: str, target: float) -> list[int]:
    """The `keep` schedule of `method` whose GMACs are the highest at or below `target`."""
    m = get_method(method)
    n_layers, n, p = len(model.blocks), vit.num_tokens(model), vit.protected_tokens(model)
    best = None
    for kept in range(1, n - p + 1):
        try:
            removed = resolve(Schedule(keep=kept / (n - p)), n_layers, n, p, m.capacity)
        except UserError:
            continue
        g = gmacs(model, method, removed)
        if g <= target and (best is None or g > best[0]):
            best = (g, removed)
    return best[1]


def constant_r_at_most(model, method: str, r: int, target: float) -> list[int]:
    """r at every block, plus one more token at the first k blocks, with the least k whose GMACs are
    at or below `target` (DTEM's embedding costs a little more than ToMe's free keys)."""
    n_layers = len(model.blocks)
    for k in range(n_layers + 1):
        removed = [r + 1] * k + [r] * (n_layers - k)
        if gmacs(model, method, removed) <= target:
            return removed
    raise SystemExit(f"{method}: no schedule of r={r} (+1) reaches {target:.3f} GMACs")


def patchmerger_schedule(model, layer: int, target: float) -> list[int]:
    n_layers, n, p = len(model.blocks), vit.num_tokens(model), vit.protected_tokens(model)
    opts = {"layers": [layer]}
    best = None
    for amount in range(1, n - p):
        removed = [0] * n_layers
        removed[layer] = amount
        g = gmacs(model, "patchmerger", removed, opts)
        if g <= target and (best is None or g > best[0]):
            best = (g, removed)
    if best is None:
        raise SystemExit(f"PatchMerger at block {layer} cannot reach {target:.3f} GMACs; "
                         "use an earlier --pm-layer")
    return best[1]


def sign_test(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar (binomial sign test) p-value."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(LEARNED))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: each method's own (see LR)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--pm-layer", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", default=None, help="keep the trained artifacts here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate artifacts already trained in --runs instead of training again")
    ap.add_argument("--out", default="benchmarks/results/learned")
    args = ap.parse_args()
    weights = SHARED / "weights" / f"{MODEL}.safetensors"
    train_dir, val_dir = SHARED / "data" / "imagenet-train-1000", SHARED / "data" / "imagenet-val-1300"
    if not (weights.is_file() and train_dir.is_dir() and val_dir.is_dir()):
        print(f"needs the shared weights and images under {SHARED}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in LEARNED]
    if bad:
        print(f"unknown learned method {bad[0]!r}; choose from {', '.join(LEARNED)}", file=sys.stderr)
        return 2

    model = models.create(MODEL, weights=weights).model.eval()
    preproc = models.preprocessing(model)
    batches = list(data.loader(data.scan(val_dir, limit=args.val_limit), preproc, "squash", batch_size=100,
                               workers=args.workers))
    val, labels = torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])
    tomectl.apply(model, "tome", r=R)
    with reduction_off(model):
        ref = predict(model, val)
    tome_logits = predict(model, val)
    tome_removed = list(model.tomectl_plan.removed)
    target = gmacs(model, "tome", tome_removed)
    base = gmacs(model, "tome", [0] * len(tome_removed))
    tomectl.remove(model)
    print(f"{len(ref)} val images; unreduced {base:.3f} GMACs; ToMe r={R}: {target:.3f} GMACs", flush=True)

    rows = [_row("tome", f"r={R}", tome_removed, target, base, compare(ref, tome_logits, labels), None, None)]
    curves: dict[str, dict] = {}
    paired: dict[str, tuple[int, int, float]] = {}
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="tomectl-learned-"))
    runs.mkdir(parents=True, exist_ok=True)
    tome_right = tome_logits.argmax(-1) == ref.argmax(-1)

    for method in methods:
        if method == "dtem":
            schedule, label = Schedule(r=R), f"r={R}"
        elif method == "patchmerger":
            removed = patchmerger_schedule(model, args.pm_layer, target)
            schedule, label = (Schedule(per_layer=tuple(removed)),
                               f"M={196 - removed[args.pm_layer]} at block {args.pm_layer}")
        else:
            removed = keep_schedule_at_most(model, "ltm", target)
            schedule, label = Schedule(per_layer=tuple(removed)), "keep (matched)"
        options = {"layers": [args.pm_layer]} if method == "patchmerger" else {}
        recipe = Recipe(MODEL, schedule, method=method, method_options=options)
        lr = args.lr or LR[method]
        cfg = train_mod.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                                    limit=args.train_limit, workers=args.workers, val=str(val_dir),
                                    val_limit=args.val_limit, val_resize="squash")
        out = runs / f"{method}"
        print(f"training {method} ({label}), lr {lr:g}, {args.epochs} epochs...", flush=True)

        def progress(event, info, _m=method):
            if event == "epoch":
                print(f"  {_m} epoch {info['epoch']}: loss {info['loss']:.4f} (KL {info['kl']:.4f}, aux "
                      f"{info['aux']:.4f}) val agreement {info['agreement']:.2%}, {info['seconds']:.0f} s "
                      f"({info['img_per_s']:.1f} img/s)", flush=True)

        log_file = out / "train.json"
        if args.reuse and log_file.is_file():  # evaluate the artifact a previous run trained
            res = _logged(json.loads(log_file.read_text()))
            train_s = res.seconds
            print(f"  reusing {out} (trained in {train_s / 60:.1f} min)", flush=True)
        else:
            t0 = time.perf_counter()
            res = train_mod.train(recipe, train_dir, out, cfg, weights=weights, force=True, progress=progress)
            train_s = time.perf_counter() - t0
        trained = tomectl.load(out, weights=weights)
        logits = predict(trained, val)
        c = compare(ref, logits, labels)
        curves[method] = {"initial": res.val_initial, "epochs": [e.agreement for e in res.epochs],
                          "kl": [e.kl_val for e in res.epochs], "loss": [e.loss for e in res.epochs]}
        rows.append(_row(method, label, list(trained.tomectl_plan.removed), gmacs(
            trained, method, trained.tomectl_plan.removed, options), base, c, train_s, res))
        paired[method] = _paired(logits, ref, tome_right)
        if method == "dtem":  # the same embeddings at ToMe's GMACs
            removed = constant_r_at_most(trained, "dtem", R, target)
            tomectl.apply(trained, "dtem", per_layer=removed)
            logits = predict(trained, val)
            label = f"r={R}, {R + 1} at the first {removed.count(R + 1)} blocks"
            rows.append(_row("dtem (matched)", label, removed, gmacs(trained, "dtem", removed), base,
                             compare(ref, logits, labels), None, None))
            paired["dtem (matched)"] = _paired(logits, ref, tome_right)

    text = render(rows, paired, curves, len(ref), base, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    with atomic_file(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"model": MODEL, "base_gmacs": base, "rows": rows, "curves": curves,
                                   "paired_vs_tome": paired, "args": vars(args)}, indent=2) + "\n")
    plot(curves, rows, out.with_suffix(".png"))
    print(f"wrote {out}.md, .json, .png; artifacts in {runs}")
    return 0


#: learning rates: DTEM starts as ToMe and only nudges its embedding; the mergers learn from scratch
LR = {"dtem": 1e-3, "patchmerger": 3e-3, "ltm": 1e-3}


def _logged(doc: dict) -> train_mod.TrainResult:
    """A TrainResult back from an artifact's train.json."""
    res = train_mod.TrainResult(**{k: v for k, v in doc.items() if k != "epochs"})
    res.epochs = [train_mod.EpochLog(**e) for e in doc["epochs"]]
    return res


def _paired(logits, ref, tome_right) -> tuple[int, int, float]:
    right = logits.argmax(-1) == ref.argmax(-1)
    a, b = int((right & ~tome_right).sum()), int((~right & tome_right).sum())
    return a, b, sign_test(a, b)


def _row(method, label, removed, g, base, c, train_s, res) -> dict:
    return {"method": method, "schedule": label, "removed_per_layer": list(removed), "gmacs": g,
            "ratio": g / base, "top1": c.top1, "agreement": c.agreement,
            "agreement_ci95": list(c.agreement_ci95), "kl": c.kl, "train_s": train_s,
            "trainable_params": None if res is None else res.trainable_params}


def render(rows, paired, curves, n, base, args) -> str:
    tome = rows[0]
    lines = [
        f"DeiT-Tiny (shared weights), trained on the 1,000 shared train images ({args.epochs} epochs, batch "
        f"{args.batch_size}, frozen backbone, distillation), evaluated on {n} shared val images (squash). "
        f"Unreduced {base:.3f} GMACs.",
        "",
        "| method | schedule | GMACs | vs ToMe r=13 | top-1 | agreement [95% CI] | KL | only it / only ToMe "
        "right (p) | train time | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["agreement_ci95"]
        p = paired.get(r["method"])
        pr = "-" if p is None else f"{p[0]} / {p[1]} (p={p[2]:.2f})"
        t = "-" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
        prm = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        lines.append(f"| {r['method']} | {r['schedule']} | {r['gmacs']:.3f} | "
                     f"{r['gmacs'] / tome['gmacs'] - 1:+.1%} | "
                     f"{r['top1']:.1%} | {r['agreement']:.2%} [{lo:.1%}, {hi:.1%}] | "
                     f"{r['kl']:.4f} | {pr} | {t} | {prm} |")
    lines += ["", "Agreement on the val images per epoch (epoch 0: before training):", ""]
    for m, cv in curves.items():
        first = "-" if not cv["initial"] else f"{cv['initial']['agreement']:.2%}"
        lines.append(f"- {m}: {first} -> " + ", ".join(f"{a:.2%}" for a in cv["epochs"]))
    dtem = next((r for r in rows if r["method"] == "dtem"), None)
    if dtem is not None:
        within = abs(dtem["gmacs"] / tome["gmacs"] - 1) <= 0.01
        ok = dtem["agreement"] > tome["agreement"]
        matched = next((r for r in rows if r["method"] == "dtem (matched)"), None)
        lines += ["", f"Goal: DTEM r={R} {dtem['agreement']:.2%} vs ToMe r={R} {tome['agreement']:.2%} "
                  f"({'higher' if ok else 'NOT higher'}), GMACs {dtem['gmacs'] / tome['gmacs'] - 1:+.1%} "
                  f"({'within' if within else 'NOT within'} 1 %)"
                  + ("" if matched is None else
                     f"; at matched GMACs ({matched['gmacs'] / tome['gmacs'] - 1:+.1%}) "
                     f"DTEM {matched['agreement']:.2%}") + "."]
    return "\n".join(lines) + "\n"


def plot(curves, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m, cv in curves.items():
        ys = ([cv["initial"]["agreement"]] if cv["initial"] else []) + cv["epochs"]
        xs = list(range(len(ys))) if cv["initial"] else list(range(1, len(ys) + 1))
        ax.plot(xs, [y * 100 for y in ys], marker="o", label=m)
    ax.axhline(rows[0]["agreement"] * 100, color="grey", ls="--", label=f"ToMe r={R}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("agreement with unreduced (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("DeiT-Tiny, 1,300 shared val images: learned merging per epoch")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
