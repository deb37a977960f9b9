"""Learned methods (DTEM, PatchMerger) and `tomectl train`: relaxation, training steps, checkpoints,
resume, DDP, artifacts that reload, evaluate and export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tomectl
from tomectl import train as train_mod
from tomectl.build import build
from tomectl.cli import main
from tomectl.errors import UserError
from tomectl.recipe import Recipe
from tomectl.reduce import TokenState, apply_decision, relaxed_matching
from tomectl.schedule import Schedule

TINY = "deit_tiny_patch16_224"
ROOT = Path(__file__).resolve().parents[1]


def _small(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(TINY, img_size=64, depth=4, pretrained=False).eval()


def _image_folder(src: Path, n: int, dst: Path) -> Path:
    """n real images in an ImageFolder tree (wnid folders, so labelled)."""
    files = sorted(src.rglob("*.JPEG"))[:: max(1, 1000 // n)][:n]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.parent.name / f.name)
    return dst


# ---------------------------------------------------------------------------------------------
# DTEM


def test_untrained_dtem_is_tome_exactly():
    """The embedding starts as the keys averaged over heads: the same matching as ToMe."""
    x = torch.randn(2, 3, 64, 64)
    m = _small()
    with torch.no_grad():
        ref = tomectl.apply(m, "tome", r=4)(x)
        tomectl.remove(m)
        out = tomectl.apply(m, "dtem", r=4)(x)
    assert torch.equal(ref, out)
    assert not m.tomectl_modules.training  # fresh modules follow the model's (eval) mode


def test_relaxed_matching_conserves_mass_and_moves_about_r():
    torch.manual_seed(0)
    b, n, protected, r = 3, 41, 1, 6
    metric = torch.randn(b, n, 16)
    dec = relaxed_matching(metric, r, protected, None, layer=0)
    assert dec.n_out == n and dec.mix.shape == (b, n, n)
    # every token's mass goes somewhere
    assert torch.allclose(dec.mix.sum(dim=1), torch.ones(b, n), atol=1e-5)
    x = torch.randn(b, n, 8)
    out, state = apply_decision(dec, x, TokenState(protected=protected))
    assert torch.allclose(state.size.sum(dim=(1, 2)), torch.full((b,), float(n)), atol=1e-4)
    assert torch.equal(out[:, :protected], x[:, :protected])  # the class token is untouched
    moved = (1 - dec.presence[:, protected:, 0]).sum(dim=1)
    assert torch.all((moved > r - 1.0) & (moved <= r + 1e-4)), moved
    # a second relaxed step sees who is (mostly) gone and moves mass only among the live tokens
    dec2 = relaxed_matching(metric, r, protected, dec.presence, layer=1)
    assert torch.all(dec2.presence <= dec.presence + 1e-6)


def test_relaxed_matching_is_differentiable():
    metric = torch.randn(2, 21, 8, requires_grad=True)
    dec = relaxed_matching(metric, 4, 1, None)
    x = torch.randn(2, 21, 5)
    out, _ = apply_decision(dec, x, TokenState(protected=1))
    out.square().sum().backward()
    assert metric.grad is not None and metric.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# PatchMerger


def test_patchmerger_token_counts_and_protected_tokens():
    m = _small()
    tomectl.apply(m, "patchmerger", per_layer=[0, 0, 12, 0])  # 16 patches -> 4 at block 2
    assert list(m.tomectl_modules.keys()) == ["2"]
    assert m.tomectl_modules["2"].queries.shape == (4, m.embed_dim)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, state = m.forward_tokens(x)
    assert tokens.shape == (2, 5, m.embed_dim)
    assert torch.allclose(state.size.sum(dim=1), torch.full((2, 1), 5.0))  # each query's weights sum to 1


def test_patchmerger_initialises_its_queries_from_the_first_training_batch():
    m = _small()
    tomectl.apply(m, "patchmerger", per_layer=[0, 0, 10, 0])
    module = m.tomectl_modules["2"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        m(x)  # eval mode: no initialisation
        assert not bool(module.initialised)
        module.train()
        m(x)
    assert bool(module.initialised)
    assert torch.allclose(module.queries.norm(dim=-1), torch.full((6,), module.init_beta), atol=1e-4)
    module.eval()
    with torch.no_grad():
        tokens = m.patch_embed(x)
        w = module(m.blocks[1](m.blocks[0](m._pos_embed(tokens)))[:, 1:])  # [B, 6, 16] weights over patches
    assert w.max(dim=-1).values.min() > 2.0 / 16  # not the uniform average of random near-zero queries
    state = m.tomectl_modules.state_dict()
    assert "2.initialised" in state and bool(state["2.initialised"])


def test_reapplying_keeps_learned_modules_only_for_the_same_method_and_shapes():
    m = _small()
    tomectl.apply(m, "dtem", r=4)
    emb = m.tomectl_modules
    tomectl.apply(m, "dtem", r=2)  # DTEM's embeddings do not depend on r: kept
    assert m.tomectl_modules is emb
    tomectl.apply(m, "ltm", r=2)  # another method: its own modules, not DTEM's embeddings
    assert type(m.tomectl_modules["0"]).__name__ == "MaskModule"
    tomectl.apply(m, "patchmerger", per_layer=[0, 0, 10, 0])
    q = m.tomectl_modules["2"].queries
    tomectl.apply(m, "patchmerger", per_layer=[0, 0, 8, 0])  # another M: new queries of the new shape
    assert m.tomectl_modules["2"].queries.shape == (8, m.embed_dim) and q.shape == (6, m.embed_dim)
    with torch.no_grad():
        assert m.forward_tokens(torch.randn(1, 3, 64, 64))[0].shape[1] == 1 + 8


def test_dtem_training_needs_proportional_attention(tmp_path):
    with pytest.raises(UserError, match="proportional attention"):
        train_mod.train(Recipe(TINY, Schedule.make(r=4), method="dtem", prop_attn=False), tmp_path,
                        tmp_path / "o", random_weights=True)


def test_learned_methods_without_training_are_refused_where_meaningless(tmp_path):
    with pytest.raises(UserError, match="needs trained parameters"):
        build(Recipe(TINY, Schedule.make(per_layer=[0] * 6 + [150] + [0] * 5), method="patchmerger"),
              random_weights=True)
    build(Recipe(TINY, Schedule.make(r=8), method="dtem"), random_weights=True)  # DTEM starts as ToMe
    rc = main(["train", TINY, "--method", "tome", "--r", "8", "--images", str(tmp_path), "--out",
               str(tmp_path / "o"), "--random-weights"])
    assert rc == 2


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("method,schedule",
                         [("dtem", {"r": 4}), ("patchmerger", {"per_layer": [0, 0, 10, 0]})])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(method, schedule):
    m = _small(1)
    tomectl.apply(m, method, **schedule)
    m.eval()
    m.tomectl_modules.train()
    params = [p for p in m.tomectl_modules.parameters()]
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3 if method == "dtem" else 1e-2)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    losses = []
    for _ in range(12):
        loss, parts = train_mod.distillation_loss(m, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(p.grad is None for p in m.blocks.parameters())  # the backbone stays frozen


def _train(images, out, tiny_weights, epochs=2, progress=None, resume=False, **kw):
    cfg = train_mod.TrainConfig(epochs=epochs, batch_size=2, augment="none", warmup_epochs=0, workers=0,
                                lr=1e-3, **kw)
    return train_mod.train(Recipe(TINY, Schedule.make(r=8), method="dtem"), images, out, cfg,
                           weights=tiny_weights, progress=progress, resume=resume, force=resume)


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(train_dir, tiny_weights,
                                                                              tmp_path):
    images = _image_folder(train_dir, 6, tmp_path / "imgs")
    full = _train(images, tmp_path / "full", tiny_weights)
    assert [e.epoch for e in full.epochs] == [1, 2]

    calls = {"n": 0}

    def interrupt_in_second_epoch(event, info):
        if event == "step":
            calls["n"] += 1
            if calls["n"] == 4:  # epoch 2, step 1 of 3
                raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(train_mod.TrainingInterrupted) as e:
        _train(images, out, tiny_weights, progress=interrupt_in_second_epoch)
    assert not out.exists()  # nothing half-written
    ck = torch.load(e.value.checkpoint, weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 1)
    res = _train(images, out, tiny_weights, resume=True)
    assert [x.epoch for x in res.epochs] == [1, 2] and not train_mod.checkpoint_path(out).exists()

    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / "full" / "learned.safetensors")),
            load_file(str(out / "learned.safetensors")))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_interrupt_during_validation_keeps_the_epoch_and_resume_checks_the_run(train_dir, val_dir,
                                                                               tiny_weights, tmp_path):
    images = _image_folder(train_dir, 4, tmp_path / "imgs")

    def interrupt_at_val(event, info):
        if event == "val":
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(train_mod.TrainingInterrupted) as e:
        _train(images, out, tiny_weights, progress=interrupt_at_val, val=str(val_dir), val_limit=2,
               val_resize="squash")
    ck = torch.load(e.value.checkpoint, weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 0)  # the epoch's batches all ran: resume at the next epoch
    assert len(ck["log"]) == 1 and ck["log"][0]["images"] == 4 and ck["log"][0]["agreement"] is None
    with pytest.raises(UserError, match="images 4"):  # other images: the epochs' order would differ
        _train(_image_folder(train_dir, 6, tmp_path / "more"), out, tiny_weights, resume=True)
    res = _train(images, out, tiny_weights, resume=True)
    assert [x.epoch for x in res.epochs] == [1, 2] and res.epochs[1].images == 4


@pytest.mark.slow
def test_trained_artifact_reloads_evaluates_and_exports(train_dir, val_dir, tiny_weights, tmp_path, capsys):
    images = _image_folder(train_dir, 4, tmp_path / "imgs")
    out = tmp_path / "dtem"
    rc = main(["train", TINY, "--method", "dtem", "--r", "13", "--images", str(images), "--epochs", "1",
               "--batch-size", "2", "--augment", "none", "--workers", "0", "--weights", str(tiny_weights),
               "--lr", "1e-2", "--val", str(val_dir), "--val-limit", "4", "--val-resize", "squash",
               "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["epochs"][0]["agreement"] is not None and doc["val_initial"] is not None
    assert (out / "learned.safetensors").is_file() and (out / "train.json").is_file()

    trained = tomectl.load(str(out))
    untrained = build(Recipe(TINY, Schedule.make(r=13), method="dtem"), weights=tiny_weights).model
    w_tr = trained.tomectl_modules["0"].proj.weight
    assert not torch.allclose(w_tr, untrained.tomectl_modules["0"].proj.weight)  # it learned something
    from tomectl.artifact import read

    recipe = read(out)[0]
    assert Path(recipe.learned["path"]).is_absolute() and recipe.learned["sha256"]

    rc = main(["eval", str(out), "--data", str(val_dir), "--resize", "squash", "--limit", "8",
               "--workers", "0", "--json"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["comparison"]["n"] == 8

    onnx_path = tmp_path / "dtem.onnx"
    rc = main(["export", str(out), "--onnx", str(onnx_path), "--calib-images", str(val_dir),
               "--check-images", "8", "--no-simplify", "--json"])
    assert rc == 0, capsys.readouterr()
    exp = json.loads(capsys.readouterr().out)
    assert onnx_path.is_file() and exp["onnx"]["max_abs_diff"] < 1e-3 or exp["onnx"]["near_ties"] > 0

    # a learned file that does not fit is one clear line, not a traceback
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    text = (bad / "recipe.yaml").read_text().replace("r: 13", "r: 8")
    (bad / "recipe.yaml").write_text(text.replace("removed_per_layer", "#").replace("tokens_per_layer", "#"))
    rc = main(["eval", str(bad), "--data", str(val_dir), "--limit", "2", "--workers", "0"])
    assert rc in (0, 2)  # DTEM's modules do not depend on r: r=8 reuses them
    from safetensors.torch import save_file

    save_file({"0.proj.weight": torch.zeros(3, 3)}, str(bad / "learned.safetensors"))
    import yaml

    doc = yaml.safe_load((bad / "recipe.yaml").read_text())
    doc["learned"] = {"path": "learned.safetensors"}  # no sha256: the shape check must catch it
    (bad / "recipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(UserError, match="do not fit|changed"):
        tomectl.load(str(bad))


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(train_dir, tiny_weights, tmp_path):
    images = _image_folder(train_dir, 3, tmp_path / "imgs")
    # one undecodable image: with batch size 1 one process gets a batch with nothing in it, and
    # both must skip that step together (else DDP's all-reduce waits forever on the other)
    bad = next(images.iterdir()) / "zz_broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "tomectl", "train", TINY, "--method", "dtem", "--remove", "8", "--images", str(images),
           "--epochs", "1", "--batch-size", "1", "--augment", "none", "--workers", "0",
           "--weights", str(tiny_weights), "--out", str(out), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "train.json").read_text())
    # 4 files, 2 a process; the step with the broken file is skipped on both: 1 image each
    assert log["world_size"] == 2 and log["epochs"][0]["images"] == 2
    assert tomectl.load(str(out)) is not None
