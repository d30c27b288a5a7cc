import math

import pytest
import torch

from proxytune.sampling import (
    apply_penalties,
    draw,
    min_p_filter,
    next_tokens,
    top_k_filter,
    top_p_filter,
)

P = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
NEG = float("-inf")


def test_top_k_keeps_k_best_and_k_zero_or_vocab_keeps_all():
    assert top_k_filter(P, 2).isneginf().tolist() == [[False, False, True, True]]
    assert torch.equal(top_k_filter(P, 0), P)
    assert torch.equal(top_k_filter(P, 4), P)


def test_top_p_keeps_smallest_prefix_reaching_p():
    # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so the third is not
    assert top_p_filter(P, 0.7).isneginf().tolist() == [[False, False, True, True]]
    assert top_p_filter(P, 0.5).isneginf().tolist() == [[False, True, True, True]]
    assert top_p_filter(P, 0.01).isneginf().tolist() == [[False, True, True, True]]
    assert torch.equal(top_p_filter(P, 1.0), P)


def test_top_p_works_on_unsorted_rows():
    shuffled = P[:, [2, 0, 3, 1]]
    assert top_p_filter(shuffled, 0.7).isneginf().tolist() == [[True, False, True, False]]


def test_min_p_relative_to_best():
    # 0.3 / 0.5 = 0.6 kept at min_p 0.5; 0.15 / 0.5 = 0.3 dropped
    assert min_p_filter(P, 0.5).isneginf().tolist() == [[False, False, True, True]]
    assert torch.equal(min_p_filter(P, 0.0), P)


def test_repetition_penalty_raises_probability_to_a_power():
    out = apply_penalties(P, [[1, 1]], repetition=2.0)
    assert out[0, 1].item() == pytest.approx(2 * math.log(0.3))
    assert out[0, 0].item() == pytest.approx(math.log(0.5))


def test_presence_and_frequency_penalties():
    out = apply_penalties(P, [[2, 2, 2]], presence=0.5, frequency=0.1)
    assert out[0, 2].item() == pytest.approx(math.log(0.15) - 0.5 - 0.3)


def test_greedy_is_argmax_and_ignores_generators():
    assert next_tokens(P).tolist() == [0]


def test_seeded_draws_reproduce_and_rows_are_independent():
    scores = torch.zeros(2, 50)
    g = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    a = draw(scores, g)
    assert a[0] == a[1]
    again = draw(scores, [torch.Generator().manual_seed(7)] * 1)
    assert again[0] == a[0]


def test_sampling_respects_filters():
    gens = [torch.Generator().manual_seed(s) for s in range(200)]
    picks = next_tokens(P.repeat(200, 1), temperature=1.0, top_k=2, generators=gens)
    assert set(picks.tolist()) == {0, 1}


def test_greedy_picks_what_torch_argmax_picks_ties_included():
    from proxytune.sampling import greedy

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (16, 50), generator=g).float()  # many tied maxima
    scores[3] = float("-inf")
    scores[5, 7] = float("nan")
    assert torch.equal(greedy(scores), scores.argmax(dim=-1))
    assert greedy(scores).dtype == torch.int64
    assert torch.equal(greedy(scores.double()), scores.double().argmax(dim=-1))
