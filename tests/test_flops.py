"""Analytic FLOPs (from token counts) against torch's FlopCounterMode, and known totals."""

import pytest
import timm

import tomectl
from tomectl.adapters import vit
from tomectl.flops import analytic_macs, measured_macs
from tomectl.reduce import get_method


def _both(model, removed, formulation="scatter"):
    analytic = analytic_macs(vit.dims(model), removed, get_method("tome"), formulation).total
    measured = measured_macs(model, (3, *model.patch_embed.img_size))
    return analytic, measured


def test_unreduced_deit_small_is_4_6_gmacs():
    model = timm.create_model("deit_small_patch16_224").eval()
    tomectl.apply(model, r=0)
    analytic, measured = _both(model, [0] * 12)
    assert round(analytic / 1e9, 2) == 4.60
    assert abs(measured - analytic) / analytic < 0.01  # attention matmuls are counted


@pytest.mark.parametrize("schedule,formulation", [
    ({"r": 13}, "scatter"), ({"r": 13}, "onehot"),
    ({"r": 8, "inflect": -1.0}, "scatter"), ({"keep": 0.3}, "scatter"),
])
def test_analytic_matches_measured_within_1_percent(schedule, formulation):
    model = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    tomectl.apply(model, formulation=formulation, **schedule)
    analytic, measured = _both(model, model.tomectl_plan.removed, formulation)
    assert abs(measured - analytic) / analytic < 0.01


def test_register_token_model_counts_match():
    model = timm.create_model("vit_little_patch16_reg4_gap_256").eval()
    tomectl.apply(model, r=12)
    analytic, measured = _both(model, model.tomectl_plan.removed)
    assert abs(measured - analytic) / analytic < 0.01


def test_tome_r13_on_deit_small_is_about_2_7_gmacs():
    # the ToMe paper reports DeiT-S r=13 at 2.7 GMACs (from 4.6)
    model = timm.create_model("deit_small_patch16_224")
    dims = vit.dims(model)
    assert round(analytic_macs(dims, [13] * 12, get_method("tome")).total / 1e9, 1) == 2.7
