"""Model loading: names, families, weights from file / folder / hub, and the errors for each."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from tomectl import models
from tomectl.errors import UserError


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="did you mean .*deit_small_patch16_224"):
        models.check_name("deit_smal_patch16_224")


def test_non_vit_is_refused_with_its_family():
    with pytest.raises(UserError, match="'resnet' model, not a ViT"):
        models.check_name("resnet50")
    assert models.check_name("deit_tiny_distilled_patch16_224") == "DeiT"
    assert models.check_name("vit_base_patch16_224.augreg_in21k") == "ViT"


def test_random_weights_are_reproducible():
    a = models.create("deit_tiny_patch16_224", random_weights=True)
    b = models.create("deit_tiny_patch16_224", random_weights=True)
    assert a.random_weights and a.weights.to_dict() == {"source": "random"}
    torch.testing.assert_close(a.model.pos_embed, b.model.pos_embed)


def test_weights_file_safetensors_and_pth(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224")
    sd = src.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save({"model": sd}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        lm = models.create("deit_tiny_patch16_224", weights=tmp_path / f)
        assert lm.weights.source == "file" and len(lm.weights.sha256) == 64
        torch.testing.assert_close(lm.model.head.weight, src.head.weight)


def test_weights_mismatch_names_the_keys(tmp_path):
    sd = timm.create_model("deit_tiny_patch16_224").state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["pos_embed"] = torch.zeros(1, 50, 192)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as e:
        models.create("deit_tiny_patch16_224", weights=tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing head.bias" in msg and "unexpected extra.weight" in msg and "pos_embed" in msg
    assert "\n" not in msg


def test_missing_or_corrupt_weights_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.create("deit_tiny_patch16_224", weights=tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="cannot read weights"):
        models.create("deit_tiny_patch16_224", weights=tmp_path / "junk.safetensors")


def test_weights_dir_is_used_by_name(tiny_weights, monkeypatch):
    monkeypatch.setenv(models.WEIGHTS_ENV, str(tiny_weights.parent))
    lm = models.create("deit_tiny_patch16_224")
    assert lm.weights.source == "dir"
    assert lm.weights.sha256 == "b2e17235172c1dcddacb55aa8914e2f8b4b95eb9bb7d7782f333bcbef77151b8"


def test_offline_without_weights_says_how_to_pass_them(monkeypatch, tmp_path):
    monkeypatch.setenv(models.WEIGHTS_ENV, str(tmp_path))  # an empty folder
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(models, "_hub_cached_file", lambda model: None)
    with pytest.raises(UserError, match="--weights FILE") as e:
        models.create("deit_small_patch16_224")
    assert "\n" not in str(e.value)


def test_preprocessing_comes_from_timm():
    pre = models.preprocessing(models.create("deit_tiny_patch16_224", random_weights=True).model)
    assert pre["input_size"] == [3, 224, 224] and pre["interpolation"] == "bicubic"
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
