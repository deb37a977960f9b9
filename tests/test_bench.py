"""tomectl.bench: latency statistics, configuration checks, a tiny end-to-end run with its report."""

from __future__ import annotations

import importlib.util
import json

import pytest
import timm

from tomectl import bench, bench_worker, flops, report
from tomectl.build import build
from tomectl.cli import main
from tomectl.errors import UserError
from tomectl.recipe import Recipe
from tomectl.reduced import Target
from tomectl.schedule import Schedule

TINY = "deit_tiny_patch16_224"
# timm's registered test ViT (6 blocks, width 64, 160 px): the end-to-end runs need a real pipeline,
# not DeiT-Tiny's size (each configuration starts its own process and, for onnxruntime, exports)
SMALL, SMALL_R = "test_vit", 8
HAVE_ONNX_EXPORT = importlib.util.find_spec("tomectl.export") is not None and \
    importlib.util.find_spec("tomectl.export.onnx") is not None


def test_latency_stats_percentiles():
    s = bench.LatencyStats.of([float(v) for v in range(1, 102)])  # 1..101 ms
    assert (s.min, s.p10, s.p50, s.p90, s.p99) == (1.0, 11.0, 51.0, 91.0, 100.0)
    assert s.mean == 51.0 and s.n == 101
    assert s.p95 == pytest.approx(96.0)
    assert s.spread == pytest.approx(80 / 51)
    one = bench.LatencyStats.of([3.0])
    assert one.p99 == one.p50 == 3.0 and one.std == 0.0
    with pytest.raises(ValueError):
        bench.LatencyStats.of([])


def test_entries_always_start_with_unreduced():
    model, entries = bench.entries_for(TINY, [13, 0, 8, 13])
    assert model == TINY
    assert [e.label for e in entries] == ["r=0", "r=13", "r=8"]


def test_entries_from_artifacts(tmp_path):
    from tomectl.compress import compress

    a = tmp_path / "t13"
    compress(Recipe(TINY, Schedule.make(r=13)), a, random_weights=True)
    model, entries = bench.entries_for([str(a)], [16])
    assert model == TINY
    assert [e.label for e in entries] == ["r=0", "t13", "r=16"]
    assert entries[0].recipe.weights == {"source": "random"} == entries[1].recipe.weights
    with pytest.raises(UserError, match="not an artifact"):
        bench.entries_for([str(a), str(tmp_path)], [])


@pytest.mark.parametrize("kwargs, match", [
    (dict(backends=["tensorflow"]), "unknown backend"),
    (dict(batches=[0]), "--batch"),
    (dict(iters=0), "--iters"),
    (dict(warmup=-1), "--warmup"),
    (dict(schedules=[-2]), "--r"),
])
def test_bad_configurations_refused(kwargs, match):
    args = dict(schedules=[8], backends=["torch"], batches=[1], iters=1, warmup=0, random_weights=True)
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        bench.run_bench(TINY, args.pop("schedules"), args.pop("backends"), args.pop("batches"), **args)


def test_cli_bad_backend_one_line(capsys):
    assert main(["bench", TINY, "--random-weights", "--backend", "torch,mxnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mxnet" in err


def test_gpu_backend_without_gpu_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="GPU"):
        bench.check_backends(["torch-cuda"])


def test_measure_latency_in_process():
    stats = bench.measure_latency(Recipe(TINY, Schedule.make(r=13)), "torch", 1, warmup=0, iters=2, threads=1,
                                  isolate=False, warmup_s=0)
    assert stats.n == 2 and 0 < stats.min <= stats.p50 <= stats.p99


@pytest.mark.parametrize("backends", [
    "torch",
    # ort alone: the torch rows are the run above (a backend's rows are built the same way for each)
    pytest.param("ort", marks=[
        pytest.mark.slow,  # two ONNX exports with their parity checks
        pytest.mark.skipif(not HAVE_ONNX_EXPORT, reason="tomectl.export.onnx not available"),
    ]),
])
def test_tiny_bench_end_to_end(backends, tmp_path, capsys):
    """Each configuration in its own process; report.json, report.md and the plot written."""
    out = tmp_path / "out"
    rounds = 1 if "ort" in backends else 2  # the rounds' bookkeeping is checked on the cheap torch run
    rc = main(["bench", SMALL, "--random-weights", "--r", str(SMALL_R), "--backend", backends, "--batch", "1",
               "--warmup", "0", "--warmup-s", "0", "--no-prime", "--rounds", str(rounds), "--iters", "2",
               "--threads", "1", "--report", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((out / report.JSON_NAME).read_text())
    assert doc["schema_version"] == bench.SCHEMA_VERSION and doc["kind"] == "bench"
    assert set(doc) >= {"model", "config", "rows", "evals", "provenance", "notes"}
    assert set(doc["provenance"]) >= {"versions", "machine", "date"}
    assert doc["provenance"]["versions"]["tomectl"] and doc["config"]["threads"] == 1

    rows = doc["rows"]
    assert [(r["backend"], r["label"]) for r in rows] == [(b, lab) for b in backends.split(",")
                                                         for lab in ("r=0", f"r={SMALL_R}")]
    plain = timm.create_model(SMALL).eval()  # timm's own model: the params and r=0 GMACs expected
    params = sum(p.numel() for p in plain.parameters())
    for r in rows:
        assert r["error"] is None, r["error"]
        assert set(r["latency_ms"]) == {"mean", "p10", "p50", "p90", "p95", "p99", "min", "std", "n"}
        assert r["latency_ms"]["n"] == 2 * rounds  # rounds of 2
        assert [d["n"] for d in r["rounds"]] == [2] * rounds
        assert all(d["warmup"] == {"calls": 0, "s": d["warmup"]["s"], "settled": True} for d in r["rounds"])
        assert len(r["speedup_rounds"]) == rounds
        assert isinstance(r["speedup_stable"], bool) or (rounds == 1 and r["speedup_stable"] is None)
        assert r["speedup_ci"][0] <= r["speedup"] <= r["speedup_ci"][1]
        assert r["img_per_s"] == pytest.approx(1000 / r["latency_ms"]["mean"], rel=1e-3)
        assert r["peak_mem_mb"] > 50 and r["mem_kind"] == "rss"
        assert r["params"] == params
    base, red = rows[0], rows[1]
    plain_macs = flops.measured_macs(plain, [3, *plain.patch_embed.img_size])
    assert base["baseline"] and base["speedup"] == 1.0 and base["efficiency"] == 1.0
    assert base["speedup_ci"] == [1.0, 1.0] and base["speedup_rounds"] == [1.0] * rounds
    assert base["speedup_stable"] is True or (rounds == 1 and base["speedup_stable"] is None)
    assert red["rounds"][0]["speedup"] == pytest.approx(
        base["rounds"][0]["p50_ms"] / red["rounds"][0]["p50_ms"], rel=1e-3)
    # GMACs: FlopCounterMode's, on timm's own model for r=0, and for the reduced row on the
    # formulation the row ran (scatter in torch, onehot with its assignment MatMuls in onnxruntime)
    assert base["gmacs"] == pytest.approx(plain_macs / 1e9, rel=1e-3)
    reduced = build(Recipe(SMALL, Schedule.make(r=SMALL_R)), random_weights=True, target=Target(backends))
    assert red["gmacs"] == pytest.approx(reduced.measured_macs() / 1e9, rel=1e-3)
    assert reduced.summary()["formulation"] == ("onehot" if backends == "ort" else "scatter")
    assert red["flops_ratio"] == pytest.approx(base["gmacs"] / red["gmacs"], rel=5e-3)  # GMACs to 4 places
    assert red["speedup"] == pytest.approx(base["latency_ms"]["p50"] / red["latency_ms"]["p50"], rel=1e-3)
    assert red["efficiency"] == pytest.approx(red["speedup"] / red["flops_ratio"], rel=1e-3)

    md = (out / report.MD_NAME).read_text()
    assert (f"| {backends} | 1 | r={SMALL_R} | {red['gmacs']:.3f} |" in md), md
    cell = report.speedup_cell(red)
    assert cell in md and (red["speedup_stable"] is False or "x (" in cell)
    assert (out / report.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_failure_becomes_row_error(tmp_path):
    spec = {"backend": "ort", "batch": 1, "input_size": [3, 224, 224], "threads": 1, "warmup": 0, "iters": 1,
            "onnx": str(tmp_path / "missing.onnx")}
    res = bench.run_isolated(spec, tmp_path)
    assert "error" in res and res["error"]


# --- warm-up and the spread of a speedup (synthetic samples, a fake clock) ---------------------


class FakeClock:
    """A clock advanced only by the fake fn: each call takes the next of `times_ms`."""

    def __init__(self, times_ms):
        self.t, self.times, self.calls = 0.0, list(times_ms), 0

    def __call__(self) -> float:
        return self.t

    def fn(self) -> None:
        self.t += self.times[min(self.calls, len(self.times) - 1)] / 1000.0
        self.calls += 1


def test_warm_up_plain_count_without_seconds():
    c = FakeClock([10.0])
    w = bench_worker.warm_up(c.fn, min_s=0, min_calls=3, clock=c)
    assert (w.calls, c.calls, w.settled) == (3, 3, True)
    c = FakeClock([10.0])
    assert bench_worker.warm_up(c.fn, min_s=0, min_calls=0, clock=c).calls == 0 == c.calls


def test_warm_up_runs_until_seconds_and_median_settle():
    # a slow start (the first 30 calls at 40 ms falling to 10 ms), then a steady 10 ms
    times = [40.0 - i for i in range(30)] + [10.0] * 500
    c = FakeClock(times)
    w = bench_worker.warm_up(c.fn, min_s=0.5, min_calls=5, max_s=5.0, clock=c)
    assert w.settled and w.seconds >= 0.5
    assert w.calls >= 30 + 5  # past the slope: the last two windows of 5 agree within 5 %
    assert bench_worker.settled(times[:w.calls]) and not bench_worker.settled(times[:25])
    # the running median settles before 0.5 s have run: the seconds decide
    c = FakeClock([10.0])
    w = bench_worker.warm_up(c.fn, min_s=0.5, min_calls=5, clock=c)
    assert w.settled and w.calls == 50 and w.seconds == pytest.approx(0.5)


def test_warm_up_bounded_when_it_never_settles():
    c = FakeClock([10.0 * 1.02 ** i for i in range(1000)])  # a steady drift: 10 % from window to window
    w = bench_worker.warm_up(c.fn, min_s=0.2, min_calls=5, max_s=1.0, window=5, clock=c)
    assert not w.settled and w.calls == c.calls
    assert 1.0 <= w.seconds <= 1.0 + c.times[w.calls] / 1000  # the call in flight at the bound ends it
    # the bound never cuts the calls asked for
    c = FakeClock([400.0])
    w = bench_worker.warm_up(c.fn, min_s=0.5, min_calls=5, max_s=1.0, clock=c)
    assert w.calls == 5 and not w.settled


def test_time_loop_keeps_its_signature():
    c = FakeClock([2.0])
    samples = bench_worker.time_loop(c.fn, 2, 3, None, lambda: None, clock=c)
    assert samples == pytest.approx([2.0, 2.0, 2.0]) and c.calls == 5
    c = FakeClock([2.0])
    samples = bench_worker.time_loop(c.fn, 0, None, 0.01, lambda: None, warmup_s=0.1, clock=c)
    assert c.calls == 50 + len(samples) and len(samples) == 5  # 0.1 s warm-up, then 10 ms of 2 ms calls


def _noisy(center, n, rel, seed):
    import random

    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-rel, rel)) for _ in range(n)]


def test_speedup_spread_of_agreeing_rounds():
    base = [_noisy(100, 20, 0.03, k) for k in range(3)]
    row = [_noisy(70, 20, 0.03, 10 + k) for k in range(3)]
    sp = bench.speedup_spread(base, row)
    assert sp.ratio == pytest.approx(100 / 70, rel=0.03)
    assert len(sp.rounds) == 3
    assert all(lo <= r <= hi for r, (lo, hi) in zip(sp.rounds, sp.round_ci, strict=True))
    assert sp.ci[0] <= sp.ratio <= sp.ci[1] and sp.ci[1] - sp.ci[0] < 0.1
    assert sp.stable is True
    assert bench.speedup_spread(base, row) == sp  # deterministic


def test_speedup_spread_flags_rounds_that_disagree():
    """The issue's case: the first round's ratio 0.84x, the others 1.39x."""
    base = [_noisy(100, 20, 0.02, k) for k in range(3)]
    row = [_noisy(119, 20, 0.02, 10), _noisy(72, 20, 0.02, 11), _noisy(72, 20, 0.02, 12)]
    sp = bench.speedup_spread(base, row)
    assert sp.rounds[0] == pytest.approx(0.84, abs=0.03) and sp.rounds[1] == pytest.approx(1.39, abs=0.05)
    assert sp.stable is False
    assert sp.ci[0] < 1.0 < 1.3 < sp.ci[1]  # the interval spans both answers


def test_speedup_spread_tolerates_tiny_differences_and_one_round():
    # noise-free rounds 1.40x and 1.42x: intervals are points and disjoint, but within STABLE_TOL
    sp = bench.speedup_spread([[140.0] * 5, [142.0] * 5], [[100.0] * 5, [100.0] * 5])
    assert sp.stable is True and sp.rounds == pytest.approx((1.40, 1.42))
    sp = bench.speedup_spread([[140.0] * 5, [160.0] * 5], [[100.0] * 5, [100.0] * 5])
    assert sp.stable is False
    one = bench.speedup_spread([_noisy(100, 20, 0.05, 1)], [_noisy(50, 20, 0.05, 2)])
    assert one.stable is None and one.ci[0] < 2.0 < one.ci[1] and len(one.rounds) == 1
    with pytest.raises(ValueError):
        bench.speedup_spread([[]], [[1.0]])


def test_speedup_spread_too_wide_is_no_result():
    """Seen on the shared 2-core machine: torch r=13 rounds 1.76x, 21.3x, 1.04x, each round as noisy."""
    base = [[280.0, 120.0, 2700.0, 300.0, 150.0], [2690.0, 2600.0, 150.0, 2800.0, 2700.0],
            [200.0, 190.0, 600.0, 210.0, 120.0]]
    row = [[160.0, 2500.0, 150.0, 90.0, 560.0], [126.0, 130.0, 3900.0, 110.0, 120.0],
           [193.0, 180.0, 400.0, 100.0, 250.0]]
    sp = bench.speedup_spread(base, row)
    assert sp.ci[1] > bench.WIDE_CI * sp.ci[0]
    assert sp.stable is False and "interval" in sp.why
    one = bench.speedup_spread(base[:1], row[:1])
    assert one.stable is False  # one round, but an interval this wide says nothing


def _row_with_spread(base_rounds, row_rounds):
    r = bench.BenchRow(backend="ort", batch=1, label="r=13", schedule="r=13", method="tome",
                       removed_per_layer=[13] * 12, params=1, gmacs=0.735, gmacs_base=1.254, threads=2)
    r.latency = bench.LatencyStats.of([v for rnd in row_rounds for v in rnd])
    r.spread = bench.speedup_spread(base_rounds, row_rounds)
    r.speedup = r.spread.ratio
    r.efficiency = r.speedup / r.flops_ratio
    return r


def test_row_json_and_table_show_the_spread_and_the_flag():
    base = [_noisy(100, 20, 0.02, k) for k in range(3)]
    good = _row_with_spread(base, [_noisy(72, 20, 0.02, 10 + k) for k in range(3)])
    d = good.to_dict()
    assert d["speedup_stable"] is True and len(d["speedup_rounds"]) == 3 and len(d["speedup_round_ci"]) == 3
    lo, hi = d["speedup_ci"]
    assert report.speedup_cell(d) == f"{d['speedup']:.2f}x ({lo:.2f}-{hi:.2f})"
    off = [_noisy(119, 20, 0.02, 10), _noisy(72, 20, 0.02, 11), _noisy(72, 20, 0.02, 12)]
    bad = _row_with_spread(base, off)
    d = bad.to_dict()
    assert d["speedup_stable"] is False
    cell = report.speedup_cell(d)
    assert cell.startswith("~") and cell.endswith("x ?") and "(" not in cell
    notes = bench._caveats([good, bad], (None, None))
    flagged = [n for n in notes if "unstable" in n]
    assert len(flagged) == 1 and "ort batch 1 r=13" in flagged[0] and "0.8" in flagged[0]
    # rows without a spread (older report.json files) print as before
    assert report.speedup_cell({"speedup": 1.613}) == "1.61x"


def test_time_all_primes_once_and_keeps_rounds_apart(monkeypatch, tmp_path):
    calls = []

    def fake_run_isolated(spec, workdir):
        calls.append(spec["recipe"]["schedule"])
        n = len(calls)
        return {"samples_ms": [float(n), float(n)], "peak_mem_mb": 1.0, "mem_kind": "rss",
                "warmup": {"calls": 5, "s": 0.5, "settled": True}}

    monkeypatch.setattr(bench, "run_isolated", fake_run_isolated)
    _, entries = bench.entries_for(TINY, [13])
    samples, results = bench._time_all(entries, ["torch"], [1], 2, bench._Graphs(), {}, tmp_path,
                                       lambda desc: None, prime=True)
    assert len(calls) == 1 + 2 * 2  # one thrown-away run of the first configuration, then 2 rounds of 2
    assert samples[("torch", 1, "r=0")] == [[2.0, 2.0], [4.0, 4.0]]  # call 1 (the prime) not kept
    assert samples[("torch", 1, "r=13")] == [[3.0, 3.0], [5.0, 5.0]]
    assert len(results[("torch", 1, "r=13")]["rounds"]) == 2


def test_side_by_side_splits_rounds_over_fresh_processes(monkeypatch):
    # 7 rounds over 3 processes: 3, 2, 2 rounds, each process its own seed; the ratio is the median
    # over rounds of the two configurations timed in one round, so one process whose state slows the
    # second graph (its rounds: 0.9 instead of 0.6) moves it less than the pooled medians
    specs = []

    def fake_run_isolated(spec, workdir):
        specs.append((spec["rounds"], spec["seed"]))
        slow = len(specs) == 3
        row = [10.0, 9.0 if slow else 6.0][:len(spec["configs"])]
        return {"samples_ms": [[v] * spec["rounds"] for v in row],
                "rounds": [list(row) for _ in range(spec["rounds"])], "threads": 1}

    monkeypatch.setattr(bench, "run_isolated", fake_run_isolated)
    rec = Recipe(model=TINY, schedule=Schedule.make(r=0), method="tome")
    timed = bench.time_side_by_side([(rec, None), (rec, None)], "torch", 1, rounds=7, processes=3, threads=1)
    assert specs == [(3, 0), (2, 1), (2, 2)]
    assert timed.processes == 3 and len(timed.rounds) == 7
    assert timed.ratio(1) == pytest.approx(0.6)
    assert [s.n for s in timed.stats] == [7, 7]
    # one process where there are fewer rounds than processes; the list API is the pooled stats
    specs.clear()
    stats = bench.measure_side_by_side([(rec, None)], "torch", 1, rounds=1, threads=1)
    assert specs == [(1, 0)] and len(stats) == 1
    with pytest.raises(ValueError):
        bench.time_side_by_side([(rec, None)], "torch", 1, rounds=0, threads=1)
