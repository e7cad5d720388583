"""The loss's vocabulary-wide part, computed with its gradient in one forward, against the
same terms written with autograd."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from server.editor.head_loss import HeadLoss, HeadTerms
from server.model.cpu_layout import BFloat16Linear, ColumnMajorLinear

VOCAB, HIDDEN = 40, 8


def _autograd_loss(
    head: torch.nn.Module, states: torch.Tensor, references: torch.Tensor, terms: HeadTerms
) -> torch.Tensor:
    """The terms as the loss wrote them before they were fused (`git show
    e66ebca:server/editor/train.py`)."""
    rows = states.shape[0] - references.shape[0]
    logits = head(states).float()
    loss = logits.new_zeros(())
    if rows:
        loss = loss + F.cross_entropy(logits[:rows], terms.targets)
    if references.shape[0]:
        unedited = head(references).float().log_softmax(-1)
        edited = logits[rows:].log_softmax(-1)
        kl = F.kl_div(edited, unedited, log_target=True, reduction="none").sum(-1)
        loss = loss + (terms.kl_weights * kl).sum()
        if terms.avoid_at.numel():
            said = edited[terms.avoid_at, terms.avoid_tokens]
            loss = (
                loss + (terms.avoid_weights * -torch.log1p(-said.exp().clamp(max=1 - 1e-6))).sum()
            )
    return loss


class ScaledHead(torch.nn.Linear):
    """A head that is not a plain linear layer: its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.5 * super().forward(x)


def _case(ce_rows: int, kl_rows: int, avoid: bool) -> tuple[torch.Tensor, torch.Tensor, HeadTerms]:
    torch.manual_seed(ce_rows * 10 + kl_rows)
    states = torch.randn(ce_rows + kl_rows, HIDDEN, requires_grad=True)
    references = torch.randn(kl_rows, HIDDEN)
    weights = torch.rand(kl_rows)
    at = torch.tensor([0, 2, 3] if avoid else [], dtype=torch.long)
    tokens = torch.randint(VOCAB, (len(at),))
    terms = HeadTerms(
        targets=torch.randint(VOCAB, (ce_rows,)),
        kl_weights=weights / max(kl_rows, 1),
        avoid_at=at,
        avoid_tokens=tokens,
        avoid_weights=torch.full((len(at),), 2.0) / max(len(at), 1),
    )
    return states, references, terms


def _column_major(hidden: int, vocab: int) -> torch.nn.Linear:
    return ColumnMajorLinear.from_linear(torch.nn.Linear(hidden, vocab))


def _bfloat16(hidden: int, vocab: int) -> torch.nn.Module:
    return BFloat16Linear(torch.nn.Linear(hidden, vocab))


@pytest.mark.parametrize("head_type", [torch.nn.Linear, _column_major, _bfloat16, ScaledHead])
@pytest.mark.parametrize(
    ("ce_rows", "kl_rows", "avoid"), [(3, 5, True), (3, 5, False), (4, 0, False), (0, 5, True)]
)
def test_the_fused_loss_and_gradient_are_the_terms_autograd_computes(
    head_type: Callable[[int, int], torch.nn.Module], ce_rows: int, kl_rows: int, avoid: bool
) -> None:
    """Every head training meets: a linear head's input gradient is one product with its
    weight (in either layout, in float32 or in bfloat16), any other head's autograd's."""
    torch.manual_seed(0)
    head = head_type(HIDDEN, VOCAB).requires_grad_(False)
    states, references, terms = _case(ce_rows, kl_rows, avoid)
    loss = HeadLoss(head)(states, references, terms)
    expected = _autograd_loss(head, states, references, terms)
    assert expected > 0.1
    torch.testing.assert_close(loss, expected)
    (gradient,) = torch.autograd.grad(3 * loss, states)  # the upstream gradient scales it
    (expected_gradient,) = torch.autograd.grad(3 * expected, states)
    # a bfloat16 product rounds its input: the logits' gradient, summed over the terms in
    # another order, rounds a last float32 bit differently and moves by a bfloat16 step
    tolerance = (
        {"rtol": 2e-2, "atol": 2e-2 * float(expected_gradient.abs().max())}
        if head_type is _bfloat16
        else {}
    )
    torch.testing.assert_close(gradient, expected_gradient, **tolerance)  # type: ignore[arg-type]


@pytest.mark.parametrize("head_type", [_bfloat16, torch.nn.Linear])
def test_bfloat16_states_through_a_bfloat16_head(
    head_type: Callable[[int, int], torch.nn.Module],
) -> None:
    """Training on served bfloat16 weights (`LKS_TRAIN_DTYPE=serving`, a GPU's default): the
    states and the head's weight are bfloat16; the loss is float32 and the states' gradient
    bfloat16, as autograd's."""
    torch.manual_seed(0)
    head = head_type(HIDDEN, VOCAB).to(torch.bfloat16).requires_grad_(False)
    floats, references, terms = _case(3, 5, True)
    states = floats.detach().bfloat16().requires_grad_()
    loss = HeadLoss(head)(states, references, terms)
    expected = _autograd_loss(head, states, references.bfloat16(), terms)
    assert loss.dtype == torch.float32
    # one product for the states and the references, where autograd's spec makes two: bfloat16
    # logits whose sums ran in another order round differently in their last bit
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    (gradient,) = torch.autograd.grad(loss, states)
    (expected_gradient,) = torch.autograd.grad(expected, states)
    assert gradient.dtype == torch.bfloat16
    scale = float(expected_gradient.abs().max())
    torch.testing.assert_close(gradient, expected_gradient, rtol=2e-2, atol=2e-2 * scale)


def test_an_avoided_token_the_model_is_sure_of_costs_a_finite_term_and_no_gradient() -> None:
    """p(token) over 1 - 1e-6 is clamped there: a finite loss, and the clamped term pulls on
    nothing (as autograd through the clamp)."""
    head = torch.nn.Linear(HIDDEN, VOCAB).requires_grad_(False)
    with torch.no_grad():
        head.weight[7] = 0
        head.bias[7] = 100.0  # every position says token 7
    states, references, terms = _case(0, 4, False)
    sure = HeadTerms(
        targets=terms.targets,
        kl_weights=torch.zeros(4),  # the repetition term alone
        avoid_at=torch.tensor([1]),
        avoid_tokens=torch.tensor([7]),
        avoid_weights=torch.tensor([1.0]),
    )
    loss = HeadLoss(head)(states, references, sure)
    assert torch.isfinite(loss) and loss > 10
    (gradient,) = torch.autograd.grad(loss, states)
    assert not gradient.any()
    torch.testing.assert_close(loss, _autograd_loss(head, states, references, sure))


def test_a_head_that_would_train_is_refused() -> None:
    """Its weights would get no gradient: refused rather than silently left as they are."""
    with pytest.raises(ValueError, match="frozen"):
        HeadLoss(torch.nn.Linear(HIDDEN, VOCAB))


def test_steps_of_other_sizes_reuse_the_buffers_with_each_step_s_own_result() -> None:
    """The buffers grow to the largest step and serve smaller ones after it: every step's loss
    and gradient are what a fresh HeadLoss gives."""
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB).requires_grad_(False)
    kept = HeadLoss(head)
    for ce_rows, kl_rows, avoid in [(3, 5, True), (2, 8, True), (1, 0, False), (3, 5, False)]:
        states, references, terms = _case(ce_rows, kl_rows, avoid)
        loss = kept(states, references, terms)
        (gradient,) = torch.autograd.grad(loss, states)
        fresh = HeadLoss(head)(states, references, terms)
        (fresh_gradient,) = torch.autograd.grad(fresh, states)
        torch.testing.assert_close(loss, fresh, rtol=0, atol=0)
        torch.testing.assert_close(gradient, fresh_gradient, rtol=0, atol=0)
        torch.testing.assert_close(loss, _autograd_loss(head, states, references, terms))
