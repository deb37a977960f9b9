"""The pure ToMe core: bipartite soft matching and the shared merge, on hand-made tensors."""

import pytest
import torch

from tomectl.reduce import TokenState, apply_decision, bipartite_soft_matching
from tomectl.reduce.merge import SlotDecision, slots_of


def test_matching_merges_the_most_similar_pairs():
    # The reference's partition is by absolute position: with a class token at 0, A = positions
    # 2, 4, 6 (0 is the class token, never merged) and B = positions 1, 3, 5.
    # pos2 ~ pos5 (nearly identical), pos6 ~ pos1 (close), pos4 is unlike every B token.
    e = torch.eye(4)
    metric = torch.stack([
        e[3],                         # 0: class token (A, protected)
        e[2],                         # 1: B0
        e[0],                         # 2: A0
        e[1],                         # 3: B1
        -e[0] - e[1] - e[2],          # 4: A1
        e[0] + 0.01 * e[1],           # 5: B2
        0.3 * e[1] + e[2],            # 6: A2
    ])[None]
    d = bipartite_soft_matching(metric, r=2, protected=1)
    assert d.n_out == 5
    dst = slots_of(d, 7)[0].tolist()
    assert dst[0] == 0  # the class token stays in place
    assert dst[4] == 1  # A1 (no similar partner) is kept, right after the class token
    # B tokens occupy the last 3 slots in position order: pos1 -> 2, pos3 -> 3, pos5 -> 4
    assert dst[1] == 2 and dst[3] == 3 and dst[5] == 4
    assert dst[2] == dst[5]  # A0 merged into B2
    assert dst[6] == dst[1]  # A2 merged into B0


def _kept_order_metric(protected: int) -> torch.Tensor:
    """Three free A tokens whose edges rank A1 > A2 > A0, so edge order and position order of the
    two unmerged ones (A0, A2) differ; prefix tokens orthogonal to everything."""
    e = torch.eye(8)
    a = [e[0] + 0.9 * e[3], e[1], e[2] + 0.5 * e[4]]  # edge similarities 0.74, 1.0, 0.89
    bb = [e[0], e[1], e[2]]
    free = [v for pair in zip(a, bb, strict=True) for v in pair]  # free tokens A B A B A B
    if protected % 2:  # the first free position is odd: B comes first
        free = [v for pair in zip(bb, a, strict=True) for v in pair]
    prefix = [e[5 + i % 3] * (i + 1) for i in range(protected)]
    return torch.stack(prefix + free)[None]


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
def test_unmerged_a_tokens_keep_position_order_where_there_is_a_prefix(protected):
    """The reference sorts the unmerged A indices when there is a class token (and so does tomectl
    for any prefix: class, distillation, registers); without any prefix token it keeps them in
    edge order (most similar first), as the reference does."""
    metric = _kept_order_metric(protected)
    n = metric.shape[1]
    d = bipartite_soft_matching(metric, r=1, protected=protected)
    dst = slots_of(d, n)[0].tolist()
    first_a = protected + protected % 2  # position of A0
    a_pos = [first_a, first_a + 2, first_a + 4]
    assert dst[:protected] == list(range(protected))
    assert dst[a_pos[1]] >= protected + 2  # A1 (best edge) merged into a B slot
    if protected:
        assert (dst[a_pos[0]], dst[a_pos[2]]) == (protected, protected + 1)  # position order
    else:
        assert (dst[a_pos[2]], dst[a_pos[0]]) == (0, 1)  # edge order: A2 (0.89) before A0 (0.74)


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
    d = SlotDecision(dst=torch.tensor([[0, 1, 1, 2]]), n_out=3)
    for f in ("scatter", "onehot"):
        out, st = apply_decision(d, x, state, f)
        # slot 1 = (1*[3,3] + 2*[0,6]) / 3 = [1, 5]
        torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0], [1.0, 5.0], [5.0, 5.0]]]))
        torch.testing.assert_close(st.size, torch.tensor([[[1.0], [3.0], [1.0]]]))


def test_zero_weight_prunes_a_token():
    x = torch.tensor([[[1.0], [2.0], [10.0]]])
    d = SlotDecision(dst=torch.tensor([[0, 1, 1]]), n_out=2, weight=torch.tensor([[1.0, 1.0, 0.0]]))
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
                         [(0, 196, 13), (1, 196, 13), (1, 9, 4), (5, 2, 1), (1, 197, 98),
                          (2, 196, 13), (2, 9, 4), (4, 7, 3), (5, 196, 98), (0, 9, 4)])
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
    # the reference's layout: [prefix, unmerged A (position order where there is a prefix), B]
    slots, hit = slots_of(d, n), d.match.matched(n)
    a_pos = torch.arange(protected + protected % 2, n, 2)
    b_pos = torch.arange(protected + 1 - protected % 2, n, 2)
    assert (slots[:, b_pos] == torch.arange(n - r - len(b_pos), n - r)).all()
    assert not hit[:, b_pos].any() and hit[:, a_pos].sum(-1).eq(r).all()
    for i in range(3):
        kept = slots[i, a_pos][~hit[i, a_pos]]
        assert sorted(kept.tolist()) == list(range(protected, protected + len(a_pos) - r))
        if protected:
            assert kept.tolist() == sorted(kept.tolist())
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
