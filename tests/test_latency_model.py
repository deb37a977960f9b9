"""The latency model's arithmetic on a synthetic backend, its cache, and the latency-budget search's
budget check (issue #14). No timing here: a synthetic worker returns the parts' costs of a known
formula, so every prediction can be checked exactly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tomectl import latency_model as L
from tomectl.calibrate.budget import Budget
from tomectl.calibrate.latency import MAX_LATENCY_MEASUREMENTS, search_priced
from tomectl.calibrate.space import Candidate, training_free_methods
from tomectl.errors import UserError
from tomectl.reduce import get_method

N, P, LAYERS = 197, 1, 12
FIXED, CALL = 0.7, 0.02
GAP = 1.1  # what the whole graph costs beyond its parts (weights streamed per call), in ms


def attn(n):
    return 0.006 * n + 0.1


def mlp(n):
    return 0.006 * n + 0.05


def bias(n):
    """Proportional attention's cost: paid by blocks after the first reduction (tokens have sizes)."""
    return 0.001 * n + 0.01


def merge(method, regime, n, r):
    """The decision + merge's own cost: linear in n and in r / capacity (so interpolation is exact)."""
    cap = get_method(method).capacity(n, P)
    k = {"tome": 1.0, "tofu": 1.1 if regime == "merge" else 0.9, "evit": 0.5, "bat": 1.6}[method]
    return k * (0.002 * n + 0.05 * r / cap + 0.03)


def synthetic_worker(spec):
    """What `measure_worker` returns, for costs of the formula above (plus the call overhead)."""
    methods = {m: get_method(m) for m in spec["methods"]}
    probes, caps, regimes = L.plan_probes(N, P, LAYERS, methods)
    reduce = {}
    for pr in probes:
        if pr.kind == "reduce":
            ms = attn(pr.n) + bias(pr.n) + mlp(pr.n - pr.r) + merge(pr.method, pr.regime, pr.n, pr.r)
            reduce.setdefault(pr.method, {}).setdefault(pr.regime, {})[(pr.n, pr.r)] = ms
    grid = L.token_grid(N, P)
    whole = FIXED + LAYERS * (attn(N) + mlp(N)) + GAP
    model = L.LatencyModel(key=spec["key"], n_tokens=N, protected=P, n_layers=LAYERS, fixed=FIXED, call=CALL,
                           whole=whole, block={n: attn(n) + mlp(n) for n in grid},
                           sized_block={n: attn(n) + bias(n) + mlp(n) for n in grid},
                           mlp={n: mlp(n) for n in grid},
                           reduce=reduce, capacity=caps, regimes=regimes, spread=0.01)
    spec.setdefault("calls", []).append(1)
    return model.to_dict()


def formula(method, removed):
    m = get_method(method)
    n, total, sized = N, FIXED, False
    for i, r in enumerate(removed):
        regime = m.cost_regime(i, LAYERS)
        total += attn(n) + (bias(n) if sized else 0.0) + mlp(n - r)
        total += merge(method, regime, n, r) if r else 0.0
        n -= r
        sized = sized or r > 0
    return total


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    lm, cached = L.latency_model("deit_tiny_patch16_224", "ort", threads=1,
                                 cache_dir=tmp_path_factory.mktemp("cache"), worker=synthetic_worker)
    assert not cached
    return lm


@pytest.mark.parametrize("method,removed", [
    ("tome", [13] * 11 + [0]),
    ("tome", [30, 20, 10, 5, 0, 0, 8, 8, 8, 0, 0, 0]),
    ("tofu", [10] * 12),
    ("tofu", [0, 0, 0, 0, 0, 0, 0, 40, 20, 10, 5, 0]),
    ("evit", [0, 0, 0, 70, 0, 0, 50, 0, 0, 30, 0, 0]),
    ("bat", [0, 0, 0, 118, 0, 0, 40, 0, 0, 9, 0, 0]),
    ("bat", [0] * 12),
])
def test_prediction_is_the_sum_of_the_parts(table, method, removed):
    # the parts are linear where the grid interpolates, so the sum must come out exactly
    assert table.predict_raw(method, removed) == pytest.approx(formula(method, removed), rel=1e-9)
    # the whole graph's gap over its parts is added in ms, the same for every schedule
    assert table.gap == pytest.approx(GAP, rel=1e-9)
    assert table.predict(method, removed) == pytest.approx(formula(method, removed) + GAP, rel=1e-9)


def test_prediction_falls_with_removals_and_tofu_regimes_differ(table):
    t = {r: table.predict("tome", [r] * 12) for r in (0, 10, 16)}
    assert t[16] < t[10] < t[0]
    early = [20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    late = [0] * 11 + [20]
    # ToFu prunes early (cheaper, k 0.9) and merges late (k 1.1): measured apart
    assert table.merge_ms("tofu", "prune", 100, 20) < table.merge_ms("tofu", "merge", 100, 20)
    assert table.regimes["tofu"][0] == "prune" and table.regimes["tofu"][-1] == "merge"
    assert table.predict_raw("tofu", early) == pytest.approx(formula("tofu", early), rel=1e-9)
    assert table.predict_raw("tofu", late) == pytest.approx(formula("tofu", late), rel=1e-9)


def test_merge_cost_is_exact_where_block_time_is_not_linear_in_tokens():
    # a block whose attention has steps between grid points (as GEMM kernels have at some row counts):
    # a merge's own cost is read at the reduce grid's points against a block timed at the same count,
    # so the steps cancel instead of landing in the merge (they did when the reduce grid sat between
    # token-grid points, where block(n) was interpolated)
    def stepped(n):
        return attn(n) + 0.3 * ((n // 17) % 2)

    grid = L.token_grid(N, P)
    methods = {m: get_method(m) for m in training_free_methods()}
    probes, caps, regimes = L.plan_probes(N, P, LAYERS, methods)
    reduce = {}
    for pr in probes:
        if pr.kind == "reduce":
            assert pr.n in grid
            ms = stepped(pr.n) + bias(pr.n) + mlp(pr.n - pr.r) + merge(pr.method, pr.regime, pr.n, pr.r)
            reduce.setdefault(pr.method, {}).setdefault(pr.regime, {})[(pr.n, pr.r)] = ms
    lm = L.LatencyModel(key={}, n_tokens=N, protected=P, n_layers=LAYERS, fixed=FIXED, call=CALL, whole=1.0,
                        block={n: stepped(n) + mlp(n) for n in grid}, mlp={n: mlp(n) for n in grid},
                        sized_block={n: stepped(n) + bias(n) + mlp(n) for n in grid},
                        reduce=reduce, capacity=caps, regimes=regimes)
    for method, regs in reduce.items():
        for regime, points in regs.items():
            for n, r in points:
                want = merge(method, regime, n, r)
                assert lm.merge_ms(method, regime, n, r) == pytest.approx(want, abs=1e-9)


def test_anchored_moves_every_prediction_by_one_factor(table):
    moved = table.anchored(table.whole * 1.3)
    for removed in ([13] * 11 + [0], [0] * 12):
        assert moved.predict("tome", removed) == pytest.approx(1.3 * table.predict("tome", removed))
    # anchoring again is relative to the table, not to the last anchor; the gap stays the table's
    again = moved.anchored(table.whole * 0.9)
    r13 = [13] * 11 + [0]
    assert again.predict("tome", r13) == pytest.approx(0.9 * table.predict("tome", r13))
    assert again.gap == pytest.approx(table.gap)
    back = L.LatencyModel.from_dict(json.loads(json.dumps(again.to_dict())))
    assert back.predict("bat", [0, 0, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx(
        again.predict("bat", [0, 0, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0]))


def test_a_strong_schedule_keeps_the_whole_gap_in_ms(table):
    # a schedule at half the parts' time still pays the whole gap: a share of the whole (the earlier
    # anchoring) would have put it at half, under-predicting every strong schedule
    strong = [0, 0, 0, 150, 0, 0, 0, 0, 0, 0, 0, 0]
    parts = formula("evit", strong)
    assert parts < 0.6 * formula("evit", [0] * LAYERS)
    assert table.predict("evit", strong) - parts == pytest.approx(GAP, rel=1e-9)


def test_bad_schedules_and_unknown_methods(table):
    with pytest.raises(ValueError):
        table.predict("tome", [1] * 5)
    with pytest.raises(KeyError):
        table.predict("dtem", [1] * 12)


def test_a_noisy_table_is_measured_again_and_the_quieter_kept(tmp_path):
    spreads = [0.47, 0.08]

    def worker(spec):
        d = synthetic_worker(spec)
        d["spread"] = spreads.pop(0)
        return d

    lm, _ = L.latency_model("deit_tiny_patch16_224", "torch", threads=1, cache_dir=tmp_path, worker=worker)
    assert lm.spread == 0.08 and not spreads
    # a quiet table is measured once; a second measurement no quieter keeps the first
    spreads[:] = [0.05, 0.9]
    lm, _ = L.latency_model("deit_tiny_patch16_224", "torch", threads=1, cache_dir=tmp_path, worker=worker,
                            refresh=True)
    assert lm.spread == 0.05 and spreads == [0.9]
    spreads[:] = [0.3, 0.4]
    lm, _ = L.latency_model("deit_tiny_patch16_224", "torch", threads=1, cache_dir=tmp_path, worker=worker,
                            refresh=True)
    assert lm.spread == 0.3 and not spreads


def test_cache_round_trip_key_and_corruption(tmp_path):
    spec_calls = []

    def worker(spec):
        spec_calls.append(spec["threads"])
        return synthetic_worker(spec)

    a, cached = L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=tmp_path, worker=worker)
    assert not cached and spec_calls == [1]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and not list(tmp_path.glob(".latency-*"))  # written atomically, no leftovers
    b, cached = L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=tmp_path, worker=worker)
    assert cached and spec_calls == [1] and b.to_dict() == a.to_dict()
    # another target (threads, precision, backend) is another table
    L.latency_model("deit_tiny_patch16_224", "ort", threads=2, cache_dir=tmp_path, worker=worker)
    L.latency_model("deit_tiny_patch16_224", "ort", threads=1, precision="int8", cache_dir=tmp_path,
                    worker=worker)
    L.latency_model("deit_tiny_patch16_224", "torch", threads=1, cache_dir=tmp_path, worker=worker)
    assert spec_calls == [1, 2, 1, 1] and len(list(tmp_path.glob("*.json"))) == 4
    # a truncated or foreign file is measured again, not trusted
    files[0].write_text(files[0].read_text()[:100])
    _, cached = L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=tmp_path, worker=worker)
    assert not cached
    files[0].write_text(json.dumps({"kind": "bench"}))
    _, cached = L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=tmp_path, worker=worker)
    assert not cached
    # --refresh-latency-model measures again
    _, cached = L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=tmp_path, worker=worker,
                                refresh=True)
    assert not cached


def test_unwritable_cache_and_unmodelled_backend(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cache"):
        L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=blocker / "sub",
                        worker=synthetic_worker)
    with pytest.raises(UserError, match="latency model measures"):
        L.latency_model("deit_tiny_patch16_224", "trt", threads=1, cache_dir=tmp_path,
                        worker=synthetic_worker)


def test_worker_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="could not measure the latency model"):
        L.latency_model("deit_tiny_patch16_224", "ort", threads=1, cache_dir=tmp_path,
                        worker=lambda spec: {"error": "boom"})


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_probe_graphs_are_in_the_target_precision(tmp_path, precision):
    """The probes are cut from a chain that shares block 0's weights: every block and reduce probe
    must still be converted (an int8 table of fp32 probes anchored on the int8 whole model priced
    int8 reductions 19-32 % too fast)."""
    import onnx
    import torch

    from tomectl.build import build
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule

    torch.manual_seed(0)
    model = build(Recipe(model="deit_tiny_patch16_224", schedule=Schedule.make(r=0), method="tome",
                         formulation="onehot"), random_weights=True).model
    methods = {"tome": get_method("tome")}
    probes = [L.Probe("call", N), L.Probe("fixed"), L.Probe("block", 100), L.Probe("mlp", 50),
              L.Probe("reduce", 197, 40, "tome", "all", 0)]
    spec = {"batch": 1, "input_size": [3, 224, 224], "n_tokens": N, "precision": precision}
    paths = L._graph_probes(spec, model, probes, L._probe_modules(model, probes, methods), tmp_path)
    for pr in probes[2:]:
        graph = onnx.load(str(paths[pr.name])).graph
        ops = [n.op_type for n in graph.node]
        if precision == "int8":
            assert ops.count("MatMulInteger") == (2 if pr.kind == "mlp" else 4), pr.name
        else:
            # the weight matrices (not the small index constants the merge step keeps)
            weights = [t for t in graph.initializer if len(t.dims) == 2 and min(t.dims) >= 64]
            assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), pr.name
        consts = {t.name for t in graph.initializer}
        assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in consts], pr.name


# --- the budget check of the priced search -------------------------------------------------------


class FakeMeter:
    """Measures a candidate as the formula times `drift` (the machine now vs when the table was
    measured), the unreduced model included; counts whole-model measurements."""

    def __init__(self, table, drift=1.0, bias=None):
        self.table, self.drift, self.bias = table, drift, bias or {}
        self.calls = []

    def __call__(self, cands):
        self.calls.append([(c.method, c.removed) for c in cands])
        out = []
        for c in cands:
            ms = (formula(c.method, c.removed) + GAP) * self.drift
            ms *= self.bias.get(c.method, 1.0) if any(c.removed) else 1.0
            out.append(SimpleNamespace(p50=ms, spread=0.02, graph_sha256=None))
        return out


def _space():
    from tomectl import models
    from tomectl.calibrate.space import _space_for

    loaded = models.create("deit_tiny_patch16_224", random_weights=True)
    return _space_for(loaded.model, training_free_methods(), {}, "onehot")


@pytest.fixture(scope="module")
def space():
    return _space()


def test_chosen_meets_the_budget_measured_beside_the_unreduced_model(table, space):
    meter = FakeMeter(table, drift=1.25)  # the machine is 25 % slower than when the table was measured
    budget = Budget.parse(speedup=1.5, backend="ort")
    res = search_priced(space, None, {"fp32": table}, budget, judge=None, measure=meter)
    assert res.chosen.measured_speedup >= 1.5
    assert res.chosen.latency_ms <= res.base_ms / 1.5
    assert res.n_measured <= MAX_LATENCY_MEASUREMENTS
    assert res.twin is not None and res.twin.family == "constant" and res.twin.method == "tome"
    # the error rows compare prediction and measurement for what was measured
    assert all(abs(e["error"]) < 0.05 for e in res.model_errors)


def test_a_measurement_over_the_budget_prices_again(table, space):
    # the model under-predicts ToMe by 12 %: the first finalist measures over, the search prices again
    meter = FakeMeter(table, bias={"tome": 1.12, "tofu": 1.12, "evit": 1.12, "bat": 1.12})
    budget = Budget.parse(speedup=1.4, backend="ort")
    res = search_priced(space, None, {"fp32": table}, budget, judge=None, measure=meter)
    assert res.chosen.measured_speedup >= 1.4
    assert any("priced again" in n for n in res.notes)
    assert res.n_measured <= MAX_LATENCY_MEASUREMENTS


def test_infeasible_budgets_name_the_nearest_feasible_one(table, space):
    meter = FakeMeter(table)
    with pytest.raises(UserError, match="tighter than the strongest schedule allows.*--speedup"):
        search_priced(space, None, {"fp32": table}, Budget.parse(speedup=50, backend="ort"), judge=None,
                      measure=meter)
    with pytest.raises(UserError, match="looser than the unreduced model"):
        search_priced(space, None, {"fp32": table}, Budget.parse(speedup=0.9, backend="ort"), judge=None,
                      measure=meter)
    base = FakeMeter(table)([Candidate("tome", "x", tuple([0] * 12), 1.0)])[0].p50
    with pytest.raises(UserError, match="--latency-ms"):
        search_priced(space, None, {"fp32": table}, Budget.parse(latency_ms=base / 50, backend="ort"),
                      judge=None, measure=meter)


def test_never_more_than_eight_measurements(table, space):
    # a backend the model always under-predicts by 40 %: the search gives up within the limit
    meter = FakeMeter(table, bias={m: 1.4 for m in training_free_methods()})
    fastest = min(table.predict(m, space.strongest(m)) for m in space.methods)
    speedup = round(table.whole / fastest * 0.9, 2)  # feasible as predicted, not as measured
    with pytest.raises(UserError, match="no schedule measured within the budget"):
        search_priced(space, None, {"fp32": table}, Budget.parse(speedup=speedup, backend="ort"), judge=None,
                      measure=meter)
    n = sum(len(c) for c in meter.calls) - (len(meter.calls) - 1)  # the unreduced model counted once
    assert n <= MAX_LATENCY_MEASUREMENTS


def test_a_miss_in_one_precision_reprices_that_precision_only(table, space, monkeypatch):
    """int8 graphs measure slower than their table predicts, and never below a floor (their float
    decision nodes); fp32 is predicted right. After the int8 misses, the fp32 schedule chosen must
    sit at the budget, not at the budget times the int8 corrections (2.96x for 2.0x, once)."""
    from types import SimpleNamespace

    import tomectl.calibrate.latency as latency

    fp32_meter = FakeMeter(table)
    int8_whole = table.whole / 1.4

    def measure(cands):
        out = []
        for c, st in zip(cands, fp32_meter(cands), strict=True):
            ms = st.p50
            if c.precision == "int8":
                ms = max(ms / 1.4 * (1.25 if any(c.removed) else 1.0), 0.75 * int8_whole)
            out.append(SimpleNamespace(p50=ms, spread=0.02, graph_sha256=None))
        return out

    def score_all(space, scorer, models, cands, target, judge, search_evals, seed, progress):
        # ranks int8 a little ahead of fp32 at equal reduction (as quantization costs little accuracy)
        for c in cands:
            c.n_scored, c.agreement = 1, 0.9
            c.kl = sum(c.removed) / 1000 + (0.0 if c.precision == "int8" else 0.05)
            c.scored_on = "int8 graph" if c.precision == "int8" else None
        return sorted(cands, key=Candidate.rank_key)

    monkeypatch.setattr(latency, "_score_all", score_all)
    budget = Budget.parse(speedup=2.0, backend="ort")
    models = {"fp32": table, "int8": table.anchored(int8_whole)}
    res = search_priced(space, SimpleNamespace(images=[0]), models, budget, judge=None, measure=measure)
    assert any("int8 candidates priced again" in n for n in res.notes), res.notes
    assert res.chosen.precision == "fp32"
    assert 2.0 <= res.chosen.measured_speedup <= 2.0 * 1.08, res.chosen.measured_speedup
    assert res.n_measured <= MAX_LATENCY_MEASUREMENTS
    # across rounds a schedule stays one candidate, and the ToMe twin is the one the result names
    twins = [c for c in res.candidates if c.tome_twin]
    assert len(twins) == 1 and twins[0] is res.twin
    keys = [(c.method, c.removed, c.precision) for c in res.candidates]
    assert len(keys) == len(set(keys))


def test_int8_unreduced_is_a_candidate(table, space):
    from tomectl.calibrate.latency import priced_candidates

    int8 = table.anchored(table.whole / 1.8)  # int8: 1.8x faster all over
    target = table.whole / 1.5
    cands = priced_candidates(space, {"fp32": table, "int8": int8}, target)
    zero = [c for c in cands if c.precision == "int8" and not any(c.removed)]
    assert [c.family for c in zero] == ["unreduced"], "one unreduced int8 candidate, named so"
    assert zero[0].predicted_ms <= target
    assert all(c.predicted_ms <= target for c in cands)
    assert {c.precision for c in cands} == {"fp32", "int8"}


# --- end to end: calibrate with a cached model, then bench --compare-tome ----------------------


@pytest.mark.slow
def test_calibrate_speedup_end_to_end_then_compare_tome(tmp_path, monkeypatch, in_process_workers):
    """`tomectl calibrate --speedup` on torch with the latency model in the cache (seeded with the
    synthetic table for this machine's key), real whole-model measurements, the artifact with its
    ToMe twin; then `tomectl bench --compare-tome` times both beside the unreduced model."""
    from typer.testing import CliRunner

    from tomectl.bench import _default_threads
    from tomectl.cli import get_app

    app = get_app()

    import functools

    import tomectl.bench

    # one short round per measurement process: the path is what is tested here, not the timing
    monkeypatch.setattr(tomectl.bench, "measure_side_by_side",
                        functools.partial(tomectl.bench.measure_side_by_side, rounds=1, duration=0.05))
    cache = tmp_path / "cache"
    key = L.target_key("deit_tiny_patch16_224", [3, 224, 224], "torch", "fp32", 1, 1)
    seeded = synthetic_worker({"key": key, "methods": training_free_methods()})
    L.save(L.LatencyModel.from_dict(seeded), cache)
    out = tmp_path / "cal"
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", "deit_tiny_patch16_224", "--speedup", "1.05", "--backend", "torch",
                              "--threads", "1", "--random-weights", "--cache-dir", str(cache),
                              "--out", str(out),
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["latency_model"]["fp32"]["cached"] is True
    assert doc["tome_twin"]["method"] == "tome" and doc["tome_twin"]["family"] == "constant"
    assert doc["chosen"]["latency_ms"] > 0 and doc["chosen"]["measured_speedup"] > 0
    assert 1 <= doc["latency_measurements"] <= MAX_LATENCY_MEASUREMENTS
    md = (out / "calibration.md").read_text()
    assert "The latency model" in md and "What the search bought" in md
    assert (out / "frontier.png").stat().st_size > 0
    assert _default_threads() >= 1
    rep = tmp_path / "bench"
    res = runner.invoke(app, ["bench", str(out), "--r", "0", "--compare-tome", "--backend", "torch",
                              "--threads", "1", "--random-weights", "--iters", "2", "--rounds", "1",
                              "--warmup-s", "0", "--no-prime", "--report", str(rep), "--json"])
    assert res.exit_code == 0, res.output
    labels = [r["label"] for r in json.loads((rep / "report.json").read_text())["rows"]]
    assert labels == ["r=0", "cal", "cal ToMe twin"]


def test_compare_tome_needs_a_calibrated_artifact(tmp_path, capsys):
    from tomectl.cli import main

    assert main(["bench", "deit_tiny_patch16_224", "--compare-tome", "--random-weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--compare-tome" in err[0]


def test_reduced_precision_candidates_are_validated_on_the_calibration_images(monkeypatch, tmp_path):
    """calibrate's int8 candidates are checked on the images it was given (--images), not on a shared
    folder a user's machine does not have."""
    import tomectl.bench as bench
    from tomectl.calibrate.latency import GraphJudge

    seen = {}

    def export(recipe, batch, **kw):
        seen.update(kw)
        Path(kw["onnx_out"]).write_bytes(b"graph")
        return "", ""

    monkeypatch.setattr(bench, "export_for_bench", export)
    budget = Budget.parse(speedup=1.5, backend="ort", precision="fp32,int8")
    judge = GraphJudge("deit_tiny_patch16_224", budget, {"source": "file", "path": "w.safetensors"}, 1,
                       images=str(tmp_path / "mine"), workdir=tmp_path / "work")
    (tmp_path / "work").mkdir()
    path = judge.graph(Candidate("tome", "constant", tuple([1] * 12), 1.0, precision="int8"))
    assert path.read_bytes() == b"graph"
    assert seen["precision"] == "int8" and seen["check_images"] == str(tmp_path / "mine")
