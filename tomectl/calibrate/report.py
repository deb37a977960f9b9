"""What a calibration writes beside its artifact: calibration.json, calibration.md and frontier.png."""

from __future__ import annotations

import json
from pathlib import Path

from ..schedule import token_counts
from .run import CalibrationResult
from .search import SCREEN_IMAGES


def write_reports(result: CalibrationResult, out_dir: Path, n_tokens: int) -> None:
    """calibration.json, calibration.md and frontier.png into `out_dir` (an artifact being written)."""
    (out_dir / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out_dir / "calibration.md").write_text(markdown(result, n_tokens))
    plot_frontier(result, out_dir / "frontier.png")


def markdown(result: CalibrationResult, n_tokens: int) -> str:
    lines = [
        f"# Calibration: {result.model}",
        "",
        f"- budget: {result.budget.describe()}"
        + (f" = {result.gmacs_budget:.3f} GMACs" if result.gmacs_budget else ""),
        f"- unreduced: {result.base_gmacs:.3f} GMACs"
        + (f", {result.base_latency_ms:.2f} ms" if result.base_latency_ms else ""),
        f"- scored on {result.n_images} images" + (f" from `{result.images}`" if result.images else "")
        + " against the unreduced model (family candidates screened on the first "
        + f"{min(SCREEN_IMAGES, result.n_images)}); ranked by mean KL, then agreement",
        f"- latency measurements: {result.latency_measurements}" if result.budget.is_latency else "",
        f"- time: {result.seconds:.1f} s",
        "",
        "| | method | schedule | precision | removed per layer | final tokens | GMACs | predicted ms "
        "| latency ms | images | agreement | KL | top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def fmt(v, f):
        return "" if v is None else format(v, f)

    for c in sorted(result.candidates,
                    key=lambda c: (not c.chosen, c.kl if c.kl is not None else 9e9, c.gmacs)):
        mark = "**chosen**" if c.chosen else ("ToMe twin" if c.tome_twin else "")
        lines.append(
            f"| {mark} | {c.method} | {c.family} | {c.precision}"
            + (" (own graph)" if c.scored_on else "") + f" | {' '.join(map(str, c.removed))} | "
            f"{token_counts(c.removed, n_tokens)[-1]} | {c.gmacs:.3f} | {fmt(c.predicted_ms, '.2f')} | "
            f"{fmt(c.latency_ms, '.2f')} | "
            f"{c.n_scored or ''} | "
            f"{fmt(c.agreement, '.1%')} | {fmt(c.kl, '.4f')} | {fmt(c.top1, '.1%')} |"
        )
    lines += _latency_sections(result)
    for n in result.notes:
        lines.append(f"\nNote: {n}")
    return "\n".join(line for line in lines if line is not None) + "\n"


def _latency_sections(result: CalibrationResult) -> list[str]:
    """The ToMe twin comparison and the latency model's accuracy (latency budgets)."""
    if not result.budget.is_latency or not result.latency_model:
        return []
    out = ["", "## What the search bought", ""]
    c = result.chosen
    twin = next((t for t in result.candidates if t.tome_twin), None)
    out.append("| | schedule | precision | measured ms | speedup (timed side by side) | agreement |")
    out.append("|---|---|---|---|---|---|")
    for label, x in (("chosen", c), ("constant-r ToMe at the budget", twin)):
        if x is None:
            continue
        sp = "" if x.measured_speedup is None else f"{x.measured_speedup:.2f}x"
        ag = "" if x.agreement is None else f"{x.agreement:.1%}"
        lat = "" if x.latency_ms is None else f"{x.latency_ms:.2f}"
        out.append(f"| {label} | {x.method} {x.family} | {x.precision} | {lat} | {sp} | {ag} |")
    out += ["", "## The latency model", ""]
    for p, info in result.latency_model.items():
        out.append(f"- {p}: {'from the cache' if info['cached'] else 'measured for this run'} "
                   f"({info['key'].get('backend')}, batch {info['key'].get('batch')}, threads "
                   f"{info['key'].get('threads')}; probe spread {info['probe_spread']:.1%}; unreduced "
                   f"{info['whole_ms']:.2f} ms, of which {info['gap_ms']:.2f} ms beyond the sum of its "
                   "parts, added to every schedule)")
    if result.model_errors:
        out += ["", "Predicted (anchored on the unreduced model timed beside it) vs measured:", "",
                "| method | precision | predicted ms | measured ms | error |", "|---|---|---|---|---|"]
        for e in result.model_errors:
            out.append(f"| {e['method']} | {e['precision']} | {e['predicted_ms']:.2f} | "
                       f"{e['measured_ms']:.2f} | {e['error']:+.1%} |")
    return out


def plot_frontier(result: CalibrationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    # only candidates scored on all images (screened-only ones saw a subset: not comparable)
    scored = [c for c in result.candidates if c.agreement is not None and c.n_scored == result.n_images]
    priced = result.budget.is_latency and any(c.predicted_ms is not None for c in result.candidates)
    use_latency = priced or (result.budget.is_latency and all(c.latency_ms is not None
                                                              for c in result.candidates))
    if priced:
        def xs_of(c):
            return c.latency_ms if c.latency_ms is not None else c.predicted_ms
    else:
        def xs_of(c):
            return c.latency_ms if use_latency else c.gmacs
    if scored:
        for method in sorted({c.method for c in scored}):
            pts = [c for c in scored if c.method == method]
            ax.scatter([xs_of(c) for c in pts if xs_of(c) is not None],
                       [100 * c.agreement for c in pts if xs_of(c) is not None],
                       label=method, s=22, alpha=0.8)
        ax.set_ylabel("top-1 agreement with unreduced (%)")
    else:
        pts = [c for c in result.candidates if c.latency_ms is not None]
        ax.plot([c.gmacs for c in pts], [c.latency_ms for c in pts], "o-", label="measured")
        ax.set_ylabel("latency (ms)")
        use_latency = False
    twin = next((t for t in result.candidates if t.tome_twin and t.agreement is not None), None)
    if scored and twin is not None and xs_of(twin) is not None:
        ax.scatter([xs_of(twin)], [100 * twin.agreement], marker="s", s=90, facecolors="none",
                   edgecolors="black", label="constant-r ToMe (twin)", zorder=5)
    measured = [c for c in scored if c.latency_ms is not None]
    if priced and measured:
        ax.scatter([c.latency_ms for c in measured], [100 * c.agreement for c in measured], marker="o", s=70,
                   facecolors="none", edgecolors="gray", label="measured (others: predicted)", zorder=4)
    c = result.chosen
    if scored and c.agreement is not None and xs_of(c) is not None:
        ax.scatter([xs_of(c)], [100 * c.agreement], marker="*", s=220, color="crimson", label="chosen",
                   zorder=5)
    budget_x = None
    if result.gmacs_budget and not use_latency:
        budget_x = result.gmacs_budget
    elif use_latency:
        budget_x = result.budget.value if result.budget.kind == "latency_ms" else (
            result.base_latency_ms / result.budget.value if result.base_latency_ms else None)
    if budget_x:
        ax.axvline(budget_x, color="gray", linestyle="--", label="budget")
    ax.set_xlabel("latency (ms)" if use_latency else "GMACs")
    ax.set_title(f"{result.model}: {result.budget.describe()}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
