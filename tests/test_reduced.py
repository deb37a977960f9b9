"""tomectl.reduced: one reduced-model object; what is timed, calibrated and reported is what ships.

- the reduction switched off (without reinstalling) is timm's model exactly, for several families;
- timm's entry points agree (forward == forward_head(forward_features)), forward_intermediates
  is refused while reduced;
- every GMACs figure equals torch's FlopCounterMode on the formulation the target gets;
- `bench --backend ort` and calibrate's latency measurement time the very bytes `export --onnx`
  writes for the same artifact and batch;
- no module outside the adapter and `reduced.py` reads the adapter's attributes.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import timm
import torch

import tomectl
from tomectl import reduced as reduced_mod
from tomectl.build import build
from tomectl.errors import UserError
from tomectl.recipe import Recipe
from tomectl.reduced import Reduced, Target
from tomectl.schedule import Schedule

TINY = "deit_tiny_patch16_224"
SMALL = "test_vit"  # timm's registered test ViT: 6 blocks, width 64, 160 px
ROOT = Path(__file__).resolve().parents[1]

# (timm name, kwargs) small enough to run fast; class, distillation, register tokens, LayerScale,
# q/k norm and average pooling among them
FAMILIES = [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_little_patch16_reg4_gap_256", {}),
    ("vit_small_patch16_224", dict(depth=4, init_values=1e-2, qk_norm=True)),
    ("vit_small_patch16_224", dict(depth=4, global_pool="avg", class_token=False, fc_norm=False)),
]


def _model(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize("name,kwargs", FAMILIES)
def test_off_is_timm_exactly_and_entry_points_agree(name, kwargs):
    model = _model(name, kwargs)
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
        plain_feats = model.forward_features(x)
    tomectl.apply(model, r=8)
    with torch.no_grad():
        on = model(x)
        assert torch.allclose(model.forward_head(model.forward_features(x)), on, atol=1e-6)
        with reduced_mod.reduction_off(model):
            assert (model(x) - plain).abs().max() <= 1e-5
            assert (model.forward_features(x) - plain_feats).abs().max() <= 1e-5
        assert torch.equal(model(x), on)  # back on, nothing reinstalled
    assert not torch.equal(on, plain)  # the reduction does act


def test_forward_intermediates_refused_while_reduced():
    model = _model(TINY, {})
    tomectl.apply(model, r=8)
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(UserError, match="forward_intermediates"):
        model.forward_intermediates(x)
    with reduced_mod.reduction_off(model), torch.no_grad():
        final, inter = model.forward_intermediates(x)  # timm's own, unreduced
    assert len(inter) == 12 and final.shape[1] == 197
    tomectl.apply(model, r=0)
    with torch.no_grad():
        model.forward_intermediates(x)  # nothing removed: nothing to refuse


def test_off_does_not_reinstall(monkeypatch):
    red = build(Recipe(TINY, Schedule.make(r=13)), random_weights=True)
    calls = []
    monkeypatch.setattr(red.adapter, "install", lambda *a, **k: calls.append(a))
    x = torch.randn(1, 3, 224, 224)
    with red.off(), torch.no_grad():
        red.model(x)
    assert calls == []


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_macs_are_priced_on_the_installed_formulation(backend):
    red = build(Recipe(TINY, Schedule.make(r=13)), random_weights=True, target=Target(backend))
    assert red.formulation == ("onehot" if backend == "ort" else "scatter")
    measured = red.measured_macs()
    assert abs(red.macs().total - measured) / measured < 0.01
    assert red.macs_for(Target(backend)).total == red.macs().total
    other = red.macs_for(Target("torch" if backend == "ort" else "ort")).total
    assert abs(other - measured) / measured > 0.02  # the two formulations do differ by ~5 %


def test_replan_and_retarget_keep_the_numbers():
    red = build(Recipe(TINY, Schedule.make(r=13)), random_weights=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        scatter = red.model(x)
        red.retarget(Target("ort", batch=2))
        assert red.formulation == "onehot"
        assert torch.allclose(red.model(x), scatter, atol=1e-5)
        red.replan(removed=[4] * 12)
        assert red.removed == [4] * 12 and red.tokens[-1] == 197 - 48


def test_target_policy_and_refusals():
    assert Target("ort").formulation_for("scatter") == ("onehot", "default for onnxruntime")
    assert Target("trt").formulation_for("scatter")[0] == "onehot"
    assert Target("torch").formulation_for("scatter") == ("scatter", "the recipe's")
    assert Target("ort", formulation="scatter").formulation_for("onehot") == ("scatter", "asked for")
    for bad in (dict(backend="tf"), dict(precision="int4"), dict(batch=0), dict(formulation="dense")):
        with pytest.raises(UserError):
            Target(**bad)


def test_export_report_gmacs_match_flop_counter(tmp_path):
    from tomectl.export import export

    rep = export(Recipe(TINY, Schedule.make(r=13)), onnx_out=tmp_path / "m.onnx", random_weights=True,
                 check_images=2, simplify=False)
    red = build(Recipe(TINY, Schedule.make(r=13)), random_weights=True, target=Target("ort"))
    measured = red.measured_macs() / 1e9
    assert rep.formulation == "onehot"
    assert abs(rep.gmacs - measured) / measured < 0.01
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert abs(side["gmacs"] - measured) / measured < 0.01
    assert side["reduction"]["formulation"] == "onehot" == side["recipe"]["options"]["formulation"]


def test_bench_and_calibrate_time_the_bytes_export_writes(tmp_path, in_process_workers):
    """For one artifact at batch 2 (timm's 6-block test ViT: the bytes, not the size, are tested):
    the graph `tomectl export --onnx` writes, the graph `tomectl bench --backend ort` times, and the
    graph calibrate's latency measurement times are the same bytes."""
    from tomectl.bench import run_bench
    from tomectl.cli import main
    from tomectl.compress import compress
    from tomectl.models import sha256_of

    art = tmp_path / "art"
    compress(Recipe(SMALL, Schedule.make(r=8)), art, random_weights=True)
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(art), "--onnx", str(onnx), "--batch", "2", "--json"]) == 0
    shipped = sha256_of(onnx)
    onnx8 = tmp_path / "m8.onnx"  # random weights: converted, not validated
    assert main(["export", str(art), "--onnx", str(onnx8), "--batch", "2", "--precision", "int8",
                 "--json"]) == 0

    rep = run_bench([str(art)], schedules=[], backends=["ort"], batches=[2], iters=1, warmup=0, warmup_s=0,
                    rounds=1, prime=False,
                    precisions=["fp32", "int8"])
    assert [r.label for r in rep.rows] == ["r=0", "art", "r=0 int8", "art int8"]
    row = rep.row("ort", 2, "art")
    assert row.error is None and row.formulation == "onehot"
    assert row.graph_sha256 == shipped
    row8 = rep.row("ort", 2, "art int8")  # a row per precision, against the fp32 unreduced row
    assert row8.precision == "int8" and row8.error is None and row8.speedup is not None
    assert row8.graph_sha256 == sha256_of(onnx8)
    assert any("int8 graph not validated" in n for n in rep.notes)

    # calibrate's latency measurements (the priced search) export through `bench.export_for_bench`,
    # the function the bench row above was timed from: the same bytes by construction
    from tomectl.artifact import read
    from tomectl.calibrate.latency import GraphJudge

    assert "export_for_bench" in inspect.getsource(GraphJudge.graph)
    recipe, _ = read(art)

    # the bench row's GMACs are FlopCounterMode's on the graph's formulation
    measured = build(recipe, target=Target("ort", batch=2)).measured_macs() / 1e9
    assert abs(row.gmacs - measured) / measured < 0.01


def test_reduced_needs_an_installed_model():
    from tomectl import models

    loaded = models.create(TINY, random_weights=True)
    with pytest.raises(ValueError):
        Reduced(loaded, Recipe(TINY, Schedule.make(r=0)))


def test_only_the_adapter_and_reduced_read_the_adapters_attributes():
    """The adapter's attributes (tomectl_plan, tomectl_modules, _tomectl_*) are read in two places."""
    allowed = {ROOT / "tomectl" / "adapters" / "vit.py", ROOT / "tomectl" / "reduced.py"}
    offenders = []
    for path in sorted((ROOT / "tomectl").rglob("*.py")):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value
            if name and (name.startswith("tomectl_") or name.startswith("_tomectl_")) \
                    and name != "tomectl_version":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == []


def test_latency_search_measures_with_the_models_weights():
    from tomectl.calibrate.budget import Budget
    from tomectl.calibrate.search import search_latency
    from tomectl.calibrate.space import _space_for
    from tomectl.models import create

    loaded = create(TINY, random_weights=True)
    space = _space_for(loaded.model, ["tome"], {}, "onehot")
    seen = []

    class Stats:
        def __init__(self, ms):
            self.p50, self.spread, self.graph_sha256 = ms, 0.01, "x"

    def measure(rec):
        seen.append(rec.weights)
        return Stats(10.0 - 0.3 * sum(rec.schedule.per_layer))

    res = search_latency(space, TINY, "tome", Budget.parse(speedup=1.5, backend="ort"), measure=measure,
                         weights={"source": "random"})
    assert seen and all(w == {"source": "random"} for w in seen)
    assert all(c.graph_sha256 == "x" for c in res.measured)
    # priced in the onehot formulation the ort graph has
    red = build(Recipe(TINY, Schedule(per_layer=res.measured[res.chosen].removed)), random_weights=True,
                target=Target("ort"))
    assert abs(res.measured[res.chosen].gmacs - red.measured_macs() / 1e9) < 0.01 * red.measured_macs() / 1e9
