"""Writing a bench report to disk: report.json, report.md and a PNG plot, each file atomically.

Everything here works on the JSON form of a report (`BenchReport.to_dict()`, schema in
`tomectl.bench`), so a report.json read back from disk renders the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .artifact import atomic_file, write_json

JSON_NAME = "report.json"
MD_NAME = "report.md"
PLOT_NAME = "latency_vs_gmacs.png"


@dataclass(frozen=True)
class Written:
    json: Path
    markdown: Path
    plot: Optional[Path]


def _f(v, fmt: str, dash: str = "-") -> str:
    return dash if v is None else format(v, fmt)


TABLE_COLUMNS = ("backend", "batch", "schedule", "GMACs", "params (M)", "mean ms", "p50 ms", "p90 ms",
                 "p95 ms", "p99 ms", "img/s", "peak MB", "speedup", "efficiency")


def speedup_cell(r: dict) -> str:
    """A row's speedup as the tables show it: "1.39x (1.35-1.43)" with its 95 % interval; "~1.4x ?"
    where its rounds disagree beyond their spread (`speedup_stable` false): not a result."""
    s = r.get("speedup")
    if s is None:
        return "-"
    if r.get("speedup_stable") is False:
        return f"~{s:.1f}x ?"
    ci = r.get("speedup_ci")
    if r.get("baseline") or not ci:
        return f"{s:.2f}x"
    return f"{s:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})"


def table_rows(doc: dict) -> list[list[str]]:
    """The report's rows as strings, in TABLE_COLUMNS order (shared by the markdown and the CLI)."""
    out = []
    for r in doc["rows"]:
        lat = r.get("latency_ms") or {}
        if r.get("error"):
            cells = [r["backend"], str(r["batch"]), r["label"], _f(r["gmacs"], ".3f"),
                     _f(r["params"] / 1e6, ".2f")]
            cells += ["error: " + r["error"]] + [""] * (len(TABLE_COLUMNS) - len(cells) - 1)
            out.append(cells)
            continue
        out.append([
            r["backend"], str(r["batch"]), r["label"], _f(r["gmacs"], ".3f"), _f(r["params"] / 1e6, ".2f"),
            _f(lat.get("mean"), ".2f"), _f(lat.get("p50"), ".2f"), _f(lat.get("p90"), ".2f"),
            _f(lat.get("p95"), ".2f"), _f(lat.get("p99"), ".2f"), _f(r.get("img_per_s"), ".1f"),
            _f(r.get("peak_mem_mb"), ".0f"), speedup_cell(r),
            ("~" if r.get("speedup_stable") is False else "") + _f(r.get("efficiency"), ".2f"),
        ])
    return out


def _warmup(cfg: dict) -> str:
    if not cfg.get("warmup_s"):
        return f"{cfg.get('warmup')} calls"
    return (f">= {cfg.get('warmup')} calls and >= {cfg['warmup_s']} s until the median settles "
            f"(<= {cfg.get('warmup_max_s')} s)")


def markdown(doc: dict) -> str:
    cfg, prov = doc["config"], doc["provenance"]
    mach, ver, load = prov.get("machine", {}), prov.get("versions", {}), prov.get("load_average") or {}
    runs = f"{cfg['iters']} iterations" if cfg.get("duration_s") is None else f"{cfg['duration_s']} s"
    lines = [
        f"# tomectl bench: {doc['model']}",
        "",
        f"- date: {prov.get('date')}",
        f"- machine: {mach.get('cpu')} ({mach.get('cpu_count')} logical CPUs)"
        + (f", GPU {mach['gpu']}" if mach.get("gpu") else ""),
        f"- load average (1 min) at start / end: {load.get('start')} / {load.get('end')}",
        f"- threads: {cfg['threads']}; warm-up {_warmup(cfg)}, then {runs} per process; "
        f"{cfg.get('rounds', 1)} round(s) round-robin"
        + ("; the first configuration of each backend run once untimed first" if cfg.get("prime") else ""),
        f"- weights: {(cfg.get('weights') or {}).get('source', '?')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        "",
        "Latencies are per batch. Speedup: the unreduced (r=0) row's median latency over this row's, same "
        "backend and batch, same run, all rounds pooled; in brackets its 95 % interval (bootstrap over "
        "rounds, then samples); \"~1.4x ?\": unstable, not a result (the per-round ratios disagree beyond "
        "their spread, or the interval spans more than a factor 2; see the notes). Efficiency: speedup / "
        "(GMACs of r=0 / GMACs of this row); 1.0 means every multiply-accumulate saved became time saved.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(TABLE_COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(doc)]
    if doc.get("evals"):
        lines += ["", "## Accuracy (tomectl eval)", "",
                  "| target | schedule | GMACs | top-1 | agreement | n |", "|---|---|---:|---:|---:|---:|"]
        for e in doc["evals"]:
            lines.append(f"| {e.get('target')} | {e.get('schedule')} | {_f(e.get('gmacs'), '.3f')} | "
                         f"{_f(e.get('top1'), '.2%')} | {_f(e.get('agreement'), '.2%')} | {e.get('n')} |")
    for n in doc.get("notes", []):
        lines.append("")
        lines.append(f"Note: {n}")
    lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Latency per image vs GMACs, one line per backend and batch (dashed: the FLOPs-proportional
    ideal from the r=0 point); a second panel with accuracy vs GMACs where eval results are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [e for e in doc.get("evals", []) if e.get("gmacs") is not None]
    ncols = 2 if evals else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in doc["rows"]:
        if r.get("latency_ms"):
            groups.setdefault((r["backend"], r["batch"]), []).append(r)
    for (backend, batch), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["gmacs"])
        xs = [r["gmacs"] for r in rows]
        ys = [r["latency_ms"]["p50"] / batch for r in rows]
        (line,) = ax.plot(xs, ys, "o-", label=f"{backend} batch {batch}")
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = [r for r in rows if r.get("baseline")]
        if base:
            b = base[0]
            scale = b["latency_ms"]["p50"] / batch / b["gmacs"]
            ax.plot(xs, [x * scale for x in xs], "--", color=line.get_color(), alpha=0.4, linewidth=1)
    ax.set_xlabel("GMACs per image (analytic)")
    ax.set_ylabel("median latency per image (ms)")
    ax.set_title(f"{doc['model']}: latency vs GMACs (dashed: FLOPs-proportional)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evals:
        ax2 = axes[0][1]
        ev = sorted(evals, key=lambda e: e["gmacs"])
        xs = [e["gmacs"] for e in ev]
        if any(e.get("top1") is not None for e in ev):
            pts = [(e["gmacs"], e["top1"] * 100) for e in ev if e.get("top1") is not None]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="top-1 (%)")
            refs = [(e["gmacs_base"], e["ref_top1"] * 100) for e in ev
                    if e.get("ref_top1") is not None and e.get("gmacs_base") is not None]
            if refs:
                ax2.plot([refs[0][0]], [refs[0][1]], "k*", markersize=10, label="unreduced top-1 (%)")
        if any(e.get("agreement") is not None for e in ev):
            pts = [(e["gmacs"], e["agreement"] * 100) for e in ev if e.get("agreement") is not None]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s--", label="agreement with unreduced (%)")
        for e, x in zip(ev, xs, strict=True):
            y = (e.get("top1") or e.get("agreement") or 0) * 100
            ax2.annotate(e.get("schedule") or "", (x, y), textcoords="offset points", xytext=(4, 4),
                         fontsize=7)
        ax2.set_xlabel("GMACs per image (analytic)")
        ax2.set_ylabel("%")
        ax2.set_title("accuracy vs GMACs (tomectl eval)", fontsize=9)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write(doc: dict, out_dir: str | Path, make_plot: bool = True) -> Written:
    """Write report.json, report.md and the plot into `out_dir` (created if needed), each atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        from .errors import UserError

        raise UserError(f"--report {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / JSON_NAME) as tmp:
        write_json(tmp, doc)
    with atomic_file(out_dir / MD_NAME) as tmp:
        tmp.write_text(markdown(doc))
    png = None
    if make_plot and any(r.get("latency_ms") for r in doc["rows"]):
        png = out_dir / PLOT_NAME
        with atomic_file(png) as tmp:
            plot(doc, tmp)
    return Written(out_dir / JSON_NAME, out_dir / MD_NAME, png)
