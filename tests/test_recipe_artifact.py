"""Recipes (YAML) and artifact directories: validation, round trip, atomic writes."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import tomectl
from tomectl import artifact, compress, recipe
from tomectl.errors import UserError
from tomectl.schedule import Schedule

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_are_valid(path):
    r = recipe.load(path)
    from tomectl.models import check_name

    check_name(r.model)


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 7


@pytest.mark.parametrize("doc,match", [
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "colour": "red"}, "unknown key 'colour'"),
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "method": "magic"}, "unknown method 'magic'"),
    ({"model": "deit_tiny_patch16_224"}, "missing 'schedule'"),
    ({"schedule": {"r": 8}}, "'model' must name"),
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": "x"}}, "r must be a whole number"),
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "options": {"speed": 1}},
     "unknown option 'speed'"),
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "options": {"prop_attn": "yes"}}, "prop_attn"),
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "options": {"formulation": "fast"}},
     "formulation"),
    ({"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "weights": {"source": "ftp"}},
     "weights.source"),
    ([1, 2], "must be a YAML mapping"),
])
def test_bad_recipes_name_the_key(doc, match, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=match):
        recipe.load(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        recipe.load(p)
    with pytest.raises(UserError, match="does not exist"):
        recipe.load(tmp_path / "none.yaml")


def test_compress_writes_an_artifact_that_loads_back(tmp_path):
    rec = recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=13))
    out = tmp_path / "art"
    rep = compress.compress(rec, out, random_weights=True)
    assert rep.tokens_per_layer[-1] == 41
    assert abs(rep.gmacs_measured - rep.gmacs) / rep.gmacs < 0.01
    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    assert doc["removed_per_layer"] == [13] * 12 and doc["weights"] == {"source": "random"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gmacs_base"] == pytest.approx(1.2543, abs=1e-3)
    assert {"torch", "timm", "tomectl"} <= set(summary["versions"])
    # the artifact rebuilds the same reduced model
    model = tomectl.load(out)
    assert model.tomectl_plan.removed == (13,) * 12
    x = torch.randn(1, 3, 224, 224)
    ref = tomectl.apply(tomectl.models.create("deit_tiny_patch16_224", random_weights=True).model, r=13)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x))
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary leftovers


def test_existing_output_needs_force(tmp_path):
    rec = recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=4))
    out = tmp_path / "art"
    compress.compress(rec, out, random_weights=True)
    with pytest.raises(UserError, match="--force"):
        compress.compress(rec, out, random_weights=True)
    rec8 = recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=8))
    compress.compress(rec8, out, random_weights=True, force=True)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["schedule"] == {"r": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress, "measured_macs", boom)
    rec = recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=4))
    with pytest.raises(KeyboardInterrupt):
        compress.compress(rec, tmp_path / "art", random_weights=True)
    assert list(tmp_path.iterdir()) == []


def test_tampered_artifact_is_refused(tmp_path):
    rec = recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=4))
    out = tmp_path / "art"
    compress.compress(rec, out, random_weights=True)
    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    doc["tokens_per_layer"][3] = 5
    (out / "recipe.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="tokens_per_layer"):
        tomectl.load(out)
    with pytest.raises(UserError, match="no recipe.yaml"):
        artifact.read(tmp_path)


def test_artifacts_write_the_method_options_in_full(tmp_path):
    """An artifact pins every method option, defaults included (a later default change cannot
    change what it computes), and its recipe reads back as a valid recipe."""
    rec = recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=8), method="tofu",
                        method_options={"norm": "mean"})
    out = tmp_path / "art"
    compress.compress(rec, out, random_weights=True)
    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    assert doc["options"] == {"prop_attn": True, "formulation": "scatter", "transition": None, "norm": "mean"}
    back = artifact.read(out)[0]
    assert back.method_options == {"transition": None, "norm": "mean"}
    assert tomectl.load(out).tomectl_plan.options == {"transition": None, "norm": "mean"}
