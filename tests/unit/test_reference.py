"""The KL terms' reference distributions: the unedited model's top k tokens and the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.editor import reference
from server.editor.reference import kl_from_reference, reference_tops, top_of


def _exact_kl(edited_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(
        edited_logits.log_softmax(-1),
        reference_logits.log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)


def test_with_a_single_token_in_the_rest_the_kl_is_the_exact_one() -> None:
    """k >= V - 1 leaves one token in the rest, so the buckets are the tokens: the KL and its
    gradient are the full distributions'."""
    torch.manual_seed(0)
    unedited = torch.randn(5, 12) * 3
    edited = torch.randn(5, 12, requires_grad=True)
    top = top_of(unedited, 64)
    assert top.ids.shape == (5, 11)
    kl = kl_from_reference(edited, top)
    expected = _exact_kl(edited, unedited)
    torch.testing.assert_close(kl, expected)
    (gradient,) = torch.autograd.grad(kl.sum(), edited)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), edited)
    torch.testing.assert_close(gradient, expected_gradient)


def test_the_top_k_kl_is_never_above_the_exact_one_and_sees_mass_moved_into_the_rest() -> None:
    torch.manual_seed(0)
    unedited = torch.randn(64, 200) * 4
    top = top_of(unedited, 8)
    torch.testing.assert_close(top.logprobs.exp().sum(-1) + top.rest.exp(), torch.ones(64))
    # the edited model unchanged: nothing to pay
    torch.testing.assert_close(kl_from_reference(unedited, top), torch.zeros(64), atol=1e-5, rtol=0)
    edited = unedited + torch.randn(64, 200)
    coarse, exact = kl_from_reference(edited, top), _exact_kl(edited, unedited)
    assert (coarse <= exact + 1e-5).all()
    assert (coarse > 0.5 * exact).all()  # most of the KL is in the top tokens here
    # mass moved from the top tokens into one of the rest's (made the likeliest token): the
    # bucket sees it, as a top-k KL without the rest would not
    moved = unedited.clone()
    outside = unedited.argmin(-1, keepdim=True)
    moved.scatter_(-1, outside, unedited.max(-1, keepdim=True).values + 2)
    assert (kl_from_reference(moved, top) > 0.4 * _exact_kl(moved, unedited)).all()
    assert (kl_from_reference(moved, top) > 0.25).all()


def test_references_reduced_in_products_are_each_sequences_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sequences go through the head a few at a time (here three rows a product, so products
    end inside and between sequences' runs); each gets its own rows, one without a KL term none."""
    monkeypatch.setattr(reference, "_ROWS_PER_PRODUCT", 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 30, bias=False)
    rows = [2, None, 4, 1, None, 2]
    states = [None if n is None else torch.randn(n, 6) for n in rows]
    tops = reference_tops(head, states, 5)
    assert [t is None for t in tops] == [s is None for s in states]
    for state, top in zip(states, tops, strict=True):
        if state is None:
            continue
        assert top is not None
        expected = top_of(head(state).detach(), 5)
        assert top.ids.dtype == torch.int32
        torch.testing.assert_close(top.ids, expected.ids)
        torch.testing.assert_close(top.logprobs, expected.logprobs)
        torch.testing.assert_close(top.rest, expected.rest)
