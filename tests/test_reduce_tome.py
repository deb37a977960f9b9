"""The pure ToMe core: bipartite soft matching and the shared merge, on hand-made tensors."""

import pytest
import torch

from tomectl.reduce import TokenState, apply_decision, bipartite_soft_matching
from tomectl.reduce.merge import Decision, slots_of


def test_matching_merges_the_most_similar_pairs():
    # 1 protected + 6 free tokens: A = free 0,2,4 ; B = free 1,3,5.
    # free0 ~ free3 (nearly identical), free2 ~ free5 (close), free4 is unlike every B token.
    e = torch.eye(4)
    metric = torch.stack([
        e[3],                         # protected (class) token
        e[0], e[1],                   # free0 (A), free1 (B)
        0.3 * e[1] + e[2], e[0] + 0.01 * e[1],   # free2 (A), free3 (B)
        -e[0] - e[1] - e[2], e[2],    # free4 (A), free5 (B)
    ])[None]
    d = bipartite_soft_matching(metric, r=2, protected=1)
    assert d.n_out == 5
    dst = slots_of(d, 7)[0].tolist()
    assert dst[0] == 0  # the class token stays in place
    # B tokens occupy the last 3 slots in order: free1 -> 2, free3 -> 3, free5 -> 4
    assert dst[2] == 2 and dst[4] == 3 and dst[6] == 4
    assert dst[1] == dst[4]  # free0 merged into free3
    assert dst[3] == dst[6]  # free2 merged into free5
    assert dst[5] == 1  # free4 (no similar partner) is kept, right after the protected token


@pytest.mark.parametrize("n_free,r", [(196, 13), (197, 98), (9, 4), (10, 5), (2, 1)])
def test_decision_is_a_valid_assignment(n_free, r):
    torch.manual_seed(0)
    protected = 2
    metric = torch.randn(3, protected + n_free, 16)
    d = bipartite_soft_matching(metric, r=r, protected=protected)
    assert d.n_out == protected + n_free - r
    dst = slots_of(d, protected + n_free)
    assert dst.shape == (3, protected + n_free)
    assert (dst[:, :protected] == torch.arange(protected)).all()
    for b in range(3):
        counts = torch.bincount(dst[b], minlength=d.n_out)
        assert (counts >= 1).all()  # every output slot receives a token
        assert counts.sum() == protected + n_free
        assert (counts[:protected] == 1).all()  # nothing merges into protected tokens


def test_r_above_capacity_is_refused_and_zero_is_a_no_op():
    metric = torch.randn(1, 11, 8)
    assert bipartite_soft_matching(metric, r=0, protected=1) is None
    with pytest.raises(ValueError, match="at most 5"):
        bipartite_soft_matching(metric, r=6, protected=1)


def test_size_weighted_average_and_sizes_add_up():
    x = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [0.0, 6.0], [5.0, 5.0]]])
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0]]])
    state = TokenState(protected=1, size=size)
    d = Decision(dst=torch.tensor([[0, 1, 1, 2]]), n_out=3)
    for f in ("scatter", "onehot"):
        out, st = apply_decision(d, x, state, f)
        # slot 1 = (1*[3,3] + 2*[0,6]) / 3 = [1, 5]
        torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0], [1.0, 5.0], [5.0, 5.0]]]))
        torch.testing.assert_close(st.size, torch.tensor([[[1.0], [3.0], [1.0]]]))


def test_zero_weight_prunes_a_token():
    x = torch.tensor([[[1.0], [2.0], [10.0]]])
    d = Decision(dst=torch.tensor([[0, 1, 1]]), n_out=2, weight=torch.tensor([[1.0, 1.0, 0.0]]))
    state = TokenState.start(x, protected=1, track_source=True)
    for f in ("scatter", "onehot"):
        out, st = apply_decision(d, x, state, f)
        torch.testing.assert_close(out, torch.tensor([[[1.0], [2.0]]]))  # the pruned 10 is gone
        torch.testing.assert_close(st.size, torch.tensor([[[1.0], [1.0]]]))
        assert st.source[0, 1].tolist() == [0.0, 1.0, 0.0]


def test_scatter_and_onehot_agree_and_sources_partition_the_patches():
    torch.manual_seed(1)
    x = torch.randn(2, 50, 32)
    state = TokenState.start(x, protected=1, track_source=True)
    outs = {}
    for f in ("scatter", "onehot"):
        st, y = state, x
        for r in (10, 8, 6):
            d = bipartite_soft_matching(y[..., :16], r, protected=1)
            y, st = apply_decision(d, y, st, f)
        outs[f] = (y, st)
    (ys, ss), (yo, so) = outs["scatter"], outs["onehot"]
    assert ys.shape == (2, 50 - 24, 32)
    torch.testing.assert_close(ys, yo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ss.size, so.size)
    # every original token sits in exactly one final token, and sizes count them
    assert (ss.source.sum(dim=1) == 1).all()
    torch.testing.assert_close(ss.source.sum(dim=-1, keepdim=True), ss.size)
    assert ss.source[:, 0, 0].eq(1).all() and ss.size[:, 0, 0].eq(1).all()  # class token untouched


def test_proportional_attention_bias_is_log_size():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = TokenState(protected=1, size=size).attn_bias()
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.log(torch.tensor([1.0, 2.0, 4.0])))
    assert TokenState(protected=1).attn_bias() is None


@pytest.mark.parametrize("protected,n_free,r",
                         [(0, 196, 13), (1, 196, 13), (1, 9, 4), (5, 2, 1), (1, 197, 98)])
@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("variant", ["average", "drop", "max", "mean"])
def test_bipartite_gather_path_equals_the_slot_form(protected, n_free, r, sized, variant):
    """The scatter formulation merges a bipartite decision by gathering rows and moving only the
    matched ones (`merge._apply_bipartite`); it must give what the generic slot form gives, in
    both formulations: tokens, sizes and sources."""
    from dataclasses import replace

    from tomectl.reduce.merge import _as_slots

    g = torch.Generator().manual_seed(n_free + r)
    n = protected + n_free
    x, metric = torch.randn(3, n, 16, generator=g), torch.randn(3, n, 8, generator=g)
    size = torch.rand(3, n, 1, generator=g) * 3 + 1 if sized else None
    state = TokenState(protected, size=size, source=torch.rand(3, n, 30, generator=g))
    d = bipartite_soft_matching(metric, r, protected)
    if variant == "drop":
        d = replace(d, match=replace(d.match, drop=True))
    elif variant != "average":
        d = replace(d, norm=variant)
    out, st = apply_decision(d, x, state, "scatter")
    assert out.shape == (3, n - r, 16)
    for formulation in ("scatter", "onehot"):
        ref, ref_st = apply_decision(_as_slots(d, x), x, state, formulation)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(st.sizes(out), ref_st.sizes(ref), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(st.source, ref_st.source, atol=1e-6, rtol=1e-6)
    # a slot that receives one token is that token, bit for bit (sizes or not)
    _, one = apply_decision(d, x, TokenState(protected, size=size, source=torch.eye(n).expand(3, n, n)))
    single = one.source.sum(-1) == 1
    token = one.source.argmax(-1)
    assert torch.equal(out[single], x.gather(1, token[..., None].expand(-1, -1, 16))[single])
    if variant == "drop":
        assert single.all()


def test_bipartite_merge_is_differentiable_after_inference_mode_use():
    """The merge's cached index tables are built outside inference mode, so a model used under
    `torch.inference_mode()` can still be trained or fine-tuned afterwards in the same process."""
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 11, 8, generator=g), torch.randn(2, 11, 4, generator=g)
    d = bipartite_soft_matching(metric, 3, protected=1)
    state = TokenState(1, size=torch.rand(2, 11, 1, generator=g) + 1)
    with torch.inference_mode():
        apply_decision(d, x, state)  # fills the cache for this shape
    x = x.clone().requires_grad_(True)
    out, st = apply_decision(d, x, state)
    (out * torch.arange(8.0)).sum().backward()
    # each input token's gradient is its share of the slot it went to: the shares of a slot sum to 1
    assert torch.allclose(x.grad.sum(dim=1), torch.arange(8.0).expand(2, 8) * (11 - 3), atol=1e-5)
