import math

import pytest
import torch

from proxytune.arithmetic import (
    add_scaled,
    check_finite,
    combine_proxy,
    log_probs,
    proxy_offset,
    proxy_scores,
    top_logprobs,
)
from proxytune.errors import NumericalError

BASE = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
EXPERT = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
ANTI = torch.tensor([[1.0, 1.0, 1.0, 1.0]])


def lsm(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def test_log_probs_drops_padding_columns_before_normalising():
    lp = log_probs(torch.tensor([[0.0, 0.0, 50.0]]), vocab_size=2)
    assert lp.shape == (1, 2)
    assert torch.allclose(lp.exp(), torch.tensor([[0.5, 0.5]]))


def test_proxy_scores_equal_hand_computation():
    b, e, a = (log_probs(t) for t in (BASE, EXPERT, ANTI))
    scores = combine_proxy(b, [(e, a)], [0.5])
    hb, he, ha = lsm(BASE[0].tolist()), lsm(EXPERT[0].tolist()), lsm(ANTI[0].tolist())
    want = [hb[i] + 0.5 * (he[i] - ha[i]) for i in range(4)]
    assert scores[0].tolist() == pytest.approx(want, abs=1e-6)
    # the combined distribution: softmax of the scores
    z = math.log(sum(math.exp(x) for x in want))
    assert torch.log_softmax(scores, -1)[0].tolist() == pytest.approx(
        [w - z for w in want], abs=1e-6
    )


def test_several_pairs_add_their_offsets():
    b, e, a = (log_probs(t) for t in (BASE, EXPERT, ANTI))
    two = proxy_scores(b, [proxy_offset(e, a), proxy_offset(a, e)], [1.0, 0.25])
    assert torch.allclose(two, b + 0.75 * (e - a))


def test_expert_only_and_anti_only_pairs():
    e, a = log_probs(EXPERT), log_probs(ANTI)
    assert torch.equal(proxy_offset(e, None), e)
    assert torch.equal(proxy_offset(None, a), -a)
    with pytest.raises(ValueError, match="expert, an anti-expert"):
        proxy_offset(None, None)


def test_alpha_zero_is_exact_even_with_masked_tokens():
    b = log_probs(BASE)
    e = torch.tensor([[-math.inf, 0.0, -math.inf, -math.inf]])
    out = add_scaled(b, proxy_offset(e, log_probs(ANTI)), 0.0)
    assert torch.equal(out, b)
    per_row = add_scaled(
        b.repeat(2, 1), proxy_offset(e, log_probs(ANTI)).repeat(2, 1), torch.tensor([0.0, 1.0])
    )
    assert torch.equal(per_row[0], b[0])
    assert not torch.isnan(per_row).any()


def test_masked_in_both_gives_zero_offset_not_nan():
    e = torch.tensor([[-math.inf, 0.0]])
    a = torch.tensor([[-math.inf, -1.0]])
    assert proxy_offset(e, a).tolist() == [[0.0, 1.0]]


def test_identical_expert_and_anti_change_nothing():
    b, e = log_probs(BASE), log_probs(EXPERT)
    assert torch.equal(combine_proxy(b, [(e, e)], [3.0]), b)


def test_check_finite_names_model_and_fix():
    check_finite(BASE, "ok")
    with pytest.raises(NumericalError, match=r"'expert' produced NaN.*float32"):
        check_finite(torch.tensor([[0.0, float("nan")]]), "expert")
    with pytest.raises(NumericalError, match="infinite"):
        check_finite(torch.tensor([[0.0, float("inf")]]), "base")


def test_top_logprobs_reads_normalised_values():
    scores = torch.tensor([[0.0, math.log(3.0)]])
    top = top_logprobs(scores, torch.tensor([0]), k=5)
    assert top.chosen.tolist() == pytest.approx([math.log(0.25)])
    assert top.top_ids.tolist() == [[1, 0]]
    assert top.top_logprobs[0].tolist() == pytest.approx([math.log(0.75), math.log(0.25)])


def test_check_finite_passes_finite_logits_whose_sum_overflows():
    # the one-reduction fast path overflows to inf here; the full scan then finds nothing wrong
    check_finite(torch.full((2, 4), 3e38), "big")
    with pytest.raises(NumericalError, match=r"first at index \(1, 2\)"):
        check_finite(torch.tensor([[3e38, 3e38, 0.0], [0.0, 0.0, float("-inf")]]), "big")


def test_add_scaled_leaves_its_inputs_alone_and_broadcasts():
    scores, offset = torch.tensor([[0.0, -1.0]]), torch.tensor([[2.0, float("inf")]])
    before = (scores.clone(), offset.clone())
    assert add_scaled(scores, offset, 0.5).tolist() == [[1.0, -1.0]]
    assert torch.equal(scores, before[0]) and torch.equal(offset, before[1])
    wide = add_scaled(scores.repeat(3, 1), offset, 1.0)
    assert wide.tolist() == [[2.0, -1.0]] * 3
