"""The timm adapter: exact with the reduction off, for every supported family; clear errors otherwise."""

import pytest
import timm
import torch

import tomectl
from tomectl.adapters import adapter_for, vit
from tomectl.errors import UserError

# (timm name, extra kwargs, what it exercises). Random weights: exactness does not need real ones.
FAMILIES = [
    ("deit_tiny_patch16_224", {}, "class token"),
    ("deit_tiny_distilled_patch16_224", {}, "distillation token, two heads"),
    ("deit3_small_patch16_224", {}, "LayerScale"),
    ("vit_small_patch16_224.augreg_in21k_ft_in1k", {}, "AugReg ViT"),
    ("vit_little_patch16_reg4_gap_256", {}, "register tokens, no class token, avg pool"),
    ("vit_small_patch16_224", {"qk_norm": True}, "q/k norm"),
    ("vit_small_patch16_224", {"global_pool": "avg", "class_token": True}, "avg pool with class token"),
    ("vit_small_patch14_dinov2", {"img_size": 224}, "DINOv2 (LayerScale, 14px patches)"),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}, "DINOv2 with registers"),
    ("vit_base_patch16_224.mae", {}, "MAE"),
]


def _randomize_layerscale(model):
    # timm initialises LayerScale to 1e-5 or 1.0: give it real values so a dropped ls1/ls2 would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.rand_like(p) + 0.5)


@pytest.mark.parametrize("name,kwargs,what", FAMILIES, ids=[f"{f[0]}-{f[2]}" for f in FAMILIES])
def test_r0_is_exact_and_reduction_runs(name, kwargs, what):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    _randomize_layerscale(model)
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        ref = model(x)
        tomectl.apply(model, r=0)
        out0 = model(x)
        assert (out0 - ref).abs().max().item() <= 1e-5, what
        tomectl.apply(model, r=8)
        out8 = model(x)
        assert out8.shape == ref.shape and torch.isfinite(out8).all()
        assert (out8 - ref).abs().max().item() > 1e-4  # the reduction really changed something
        _, state = model.forward_tokens(x)
        n0 = vit.num_tokens(model)
        assert state.size.shape[1] == n0 - 8 * len(model.blocks)
        # every patch is still accounted for: sizes add up to the unprotected token count
        p = model.num_prefix_tokens
        assert state.size[:, p:].sum(dim=1).squeeze(-1).tolist() == [n0 - p] * 2
        tomectl.remove(model)
        assert type(model) is not vit.ReducedViT and not isinstance(model, vit.ReducedViT)
        assert (model(x) - ref).abs().max().item() == 0.0


def test_state_dict_keys_unchanged_and_apply_returns_same_object():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    keys = list(model.state_dict())
    out = tomectl.apply(model, r=4)
    assert out is model
    assert list(model.state_dict()) == keys
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)


def test_avg_pool_is_size_weighted():
    torch.manual_seed(0)
    model = timm.create_model("vit_little_patch16_reg4_gap_256").eval()
    tomectl.apply(model, r=10)
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        tokens, state = model.forward_tokens(x)
        p = model.num_prefix_tokens
        s = state.size[:, p:]
        pooled = (tokens[:, p:] * s).sum(1) / s.sum(1)
        expected = model.head(model.fc_norm(pooled))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_source_tracking_and_formulations_agree():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tomectl.apply(model, r=13, track_source=True)
        a, st = model.forward_tokens(x)
        tomectl.apply(model, r=13, formulation="onehot")
        b, _ = model.forward_tokens(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert st.source.shape == (2, 41, 197)
    assert (st.source.sum(dim=1) == 1).all()


@pytest.mark.parametrize("name,match", [
    ("swin_tiny_patch4_window7_224", "not a model family"),
    ("convnext_tiny", "not a model family"),
])
def test_other_architectures_are_refused(name, match):
    model = timm.create_model(name)
    with pytest.raises(UserError, match=match):
        tomectl.apply(model, r=8)


def test_attention_pool_and_odd_blocks_are_refused():
    model = timm.create_model("vit_small_patch16_224", global_pool="map")
    with pytest.raises(UserError, match="attention-pooling"):
        tomectl.apply(model, r=8)
    model = timm.create_model("vit_small_patch16_224", block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(UserError, match="ResPostBlock"):
        adapter_for(model).check_supported(model)
