"""LTM (learnable token merging): the mask module's merging weights, token counts in a timm ViT,
eval determinism, the IB-bound loss and a few training steps, analytic MACs, ONNX parity."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tomectl
from tomectl.adapters import vit
from tomectl.errors import UserError
from tomectl.flops import analytic_macs, measured_macs
from tomectl.reduce import METHODS, LayerSpec, MixDecision, Signals, TokenState, apply_decision, get_method
from tomectl.reduce.ltm import LTM, MaskModule, ltm_mix
from tomectl.schedule import token_counts


def _vit(name="deit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _small(name="deit_tiny_patch16_224", depth=3, **kw):
    """DeiT-Tiny at 64 px (16 patches): fast enough to train and export in a test."""
    return _vit(name, img_size=64, depth=depth, **kw)


def _signals(b=2, n=20, c=32, heads=2, p=1, module=None, size=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, c, generator=g)
    keys = torch.randn(b, heads, n, c // heads, generator=g)
    return Signals(x=x, keys=keys, state=TokenState(p, size=size), x_norm=F.layer_norm(x, (c,)),
                   module=module)


def _module(method, n=20, amount=7, c=32, heads=2, p=1):
    spec = LayerSpec(layer=0, n_tokens=n, amount=amount, protected=p, embed_dim=c, num_heads=heads,
                     head_dim=c // heads)
    return method.make_modules([spec])[0]


# --- the merging weights ----------------------------------------------------------------------------


def test_merging_weights_keep_every_token_and_the_protected_ones_in_place():
    method = get_method("ltm")
    module = _module(method).eval()
    size = torch.randint(1, 4, (2, 20, 1)).float()
    s = _signals(module=module, size=size)
    d = method.decide(7, s)
    assert isinstance(d, MixDecision) and d.n_out == 13 and d.mix.shape == (2, 13, 20)
    mix = d.mix
    assert torch.equal(mix[:, :1], torch.eye(20)[:1].expand(2, 1, 20))  # class token: itself only
    assert torch.equal(mix[:, 1:, :1], torch.zeros(2, 12, 1))  # never merged into anything
    assert torch.allclose(mix[:, 1:, 1:].sum(dim=1), torch.ones(2, 19), atol=1e-6)  # each token spreads 1
    # each output slot is anchored on one target token that keeps all of itself
    assert ((mix[:, 1:, 1:] == 1.0).sum(dim=-1) >= 1).all()
    out, state = apply_decision(d, s.x, s.state)
    assert out.shape == (2, 13, 32)
    assert torch.allclose(state.size.sum(dim=(1, 2)), size.sum(dim=(1, 2)))  # sizes still add up
    assert torch.allclose(out[:, 0], s.x[:, 0], atol=1e-6)
    assert module.aux_loss is None  # eval: no loss


def test_mix_without_protected_tokens_is_the_transposed_assignment():
    a = torch.rand(2, 6, 3).softmax(-1)
    assert torch.equal(ltm_mix(a, 0), a.transpose(1, 2))
    assert ltm_mix(a, 2).shape == (2, 5, 8)


def test_mask_module_starts_from_the_keys_averaged_over_heads():
    c, heads = 32, 4
    kw = torch.randn(c, c)
    kb = torch.randn(c)
    m = MaskModule(c, c // heads, 0.1, kw, kb, heads)
    assert torch.allclose(m.embed.weight, kw.reshape(heads, c // heads, c).mean(0))
    assert torch.allclose(m.embed.bias, kb.reshape(heads, c // heads).mean(0))
    assert torch.isclose(m.log_beta.exp(), torch.tensor(10.0))


def test_training_mode_leaves_a_weighted_scalar_loss_with_gradients():
    method = get_method("ltm", {"ib_weight": 0.5})
    module = _module(method).train()
    s = _signals(module=module)
    method.decide(7, s)
    loss = module.aux_loss
    assert loss.dim() == 0 and loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert module.embed.weight.grad.abs().sum() > 0 and module.score.weight.grad.abs().sum() > 0
    assert module.loss_weight == 0.5  # one acting block: the whole weight
    none = get_method("ltm", {"ib_weight": 0})
    mod0 = _module(none).train()
    none.decide(7, _signals(module=mod0))
    assert mod0.aux_loss.item() == 0.0


def test_overhead_macs_equal_the_flop_counter():
    method = get_method("ltm")
    for p, amount in ((1, 7), (2, 1), (0, 12)):
        module = _module(method, amount=amount, p=p).eval()
        s = _signals(module=module, p=p)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            apply_decision(method.decide(amount, s), s.x, s.state)
        measured = counter.get_total_flops() // 2 // 2  # MACs per image (batch 2)
        assert measured == method.overhead_macs(_spec(20, amount, p, 16, num_heads=2, embed_dim=32))
    assert method.overhead_macs(_spec(20, 0, 1, 16, 2, 32)) == 0


def _spec(n_tokens, amount, protected, head_dim, num_heads, embed_dim):
    from tomectl.reduce import LayerSpec

    return LayerSpec(layer=0, n_tokens=n_tokens, amount=amount, protected=protected, embed_dim=embed_dim,
                     num_heads=num_heads, head_dim=head_dim)


def test_options_are_checked():
    assert METHODS["ltm"] is LTM and LTM.learned and LTM.dense and not LTM.usable_untrained
    for bad, match in (({"dim": 0}, "dim"), ({"tau": 0}, "tau"), ({"tau": 2.0}, "tau"),
                       ({"ib_weight": -1}, "ib_weight"), ({"beta": "x"}, "beta"),
                       ({"layers": [1, 1]}, "twice"),
                       ({"r": 3}, "has no option")):
        with pytest.raises(UserError, match=match):
            get_method("ltm", bad)
    assert get_method("ltm").capacity(197, 1) == 195
    with pytest.raises(UserError, match="block 12"):
        get_method("ltm", {"layers": [12]}).layers(12)


# --- in a timm ViT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_token_counts_follow_the_schedule_and_protected_tokens_stay(name):
    model = _vit(name)
    tomectl.apply(model, "ltm", r=13, track_source=True)
    removed = list(model.tomectl_plan.removed)
    assert sorted(model.tomectl_modules.keys(), key=int) == [str(i) for i, r in enumerate(removed) if r]
    seen = []
    hooks = [b.norm2.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    with torch.inference_mode():
        _, state = model.forward_tokens(torch.randn(2, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert seen == token_counts(removed, vit.num_tokens(model))[1:]
    p = model.num_prefix_tokens
    assert torch.equal(state.source[:, :p], torch.eye(state.source.shape[-1])[:p].expand(2, p, -1))
    assert torch.equal(state.size[:, :p], torch.ones(2, p, 1))
    assert torch.allclose(state.size[:, p:].sum(dim=1).squeeze(-1), torch.full((2,), 196.0))


def test_layers_option_restricts_the_acting_blocks():
    model = _small(depth=4)
    tomectl.apply(model, "ltm", per_layer=[0, 3, 0, 2], options={"layers": [1, 3]})
    assert sorted(model.tomectl_modules.keys()) == ["1", "3"]
    assert model.tomectl_modules["1"].loss_weight == pytest.approx(0.05)  # 0.1 shared by 2 blocks
    with pytest.raises(UserError):
        tomectl.apply(_small(depth=4), "ltm", per_layer=[2, 0, 0, 0], options={"layers": [1]})


def test_eval_is_deterministic_and_static_shape():
    model = _small()
    tomectl.apply(model, "ltm", r=4)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        a, b = model(x), model(x)
        feats, _ = model.forward_tokens(torch.randn(3, 3, 64, 64) * 5)
    assert torch.equal(a, b)
    assert feats.shape == (3, 17 - 12, 192)
    assert all(m.aux_loss is None for m in model.tomectl_modules.values())


def test_a_few_steps_lower_distillation_plus_ib_loss_with_the_backbone_frozen():
    model = _small()
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        model.head.weight.mul_(30)  # a random head predicts near-uniformly: make the teacher confident
        teacher = model(x).log_softmax(-1)
    tomectl.apply(model, "ltm", r=4)
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in model.tomectl_modules.parameters():
        prm.requires_grad_(True)
    model.eval()
    model.tomectl_modules.train()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("tomectl_modules")}
    opt = torch.optim.AdamW(model.tomectl_modules.parameters(), lr=1e-2)

    def loss_fn():
        kl = F.kl_div(model(x).log_softmax(-1), teacher, log_target=True, reduction="batchmean")
        aux = sum(m.aux_loss for m in model.tomectl_modules.values())
        return kl + aux, kl, aux

    losses = []
    for _ in range(12):
        loss, kl, aux = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_fn()[0].item()
    assert final < losses[0] * 0.9, losses + [final]
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("tomectl_modules")}
    assert all(torch.equal(after[k], v) for k, v in backbone.items())


def test_analytic_macs_match_the_flop_counter():
    model = _vit("deit_tiny_distilled_patch16_224")
    tomectl.apply(model, "ltm", r=13)
    removed = model.tomectl_plan.removed
    analytic = analytic_macs(vit.dims(model), removed, get_method("ltm")).total
    measured = measured_macs(model, (3, 224, 224))
    assert abs(measured - analytic) / analytic < 0.01


def test_onnx_export_parity(tmp_path):
    onnx_export = pytest.importorskip("tomectl.export.onnx")
    pytest.importorskip("onnxruntime")
    model = _small(depth=2)
    tomectl.apply(model, "ltm", r=4)
    images = torch.randn(4, 3, 64, 64)
    res = onnx_export.export_onnx(model, tmp_path / "ltm.onnx", batch=2, input_size=(3, 64, 64),
                                  check_inputs=images, simplify=False)
    assert res.max_abs_diff <= 1e-4 and res.top1_agreement == 1.0
    assert res.output_shape == [2, 1000]
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "ltm.onnx")).graph.node}
    assert not any(op.startswith("Scatter") for op in ops)
