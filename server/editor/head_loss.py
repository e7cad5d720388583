"""The training loss's vocabulary-wide part: the output head over a step's predict positions
and the terms read from its logits (cross-entropy on the edits' targets, KL to the unedited
model, unlikelihood of a repeated target), computed with its gradient in one forward.

Every term's gradient with respect to the logits has a closed form (softmax minus the target
distribution, give or take a row's weight), so the forward writes it in place over the
logits, and no vocabulary-wide tensor outlives the step's forward: autograd would keep the
log-softmaxes, the KL's elementwise terms, and zero-filled gradients for every slice and
index taken from the logits, each as wide as the vocabulary and several times a step's rows.
The backward is the head's input gradient alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.cpu_layout import linear_weight

# p(avoided token) is clamped here, so -log(1 - p) stays finite (and its gradient is 0 there)
_MAX_AVOIDED = 1 - 1e-6


@dataclass(frozen=True)
class HeadTerms:
    """What a step's logits are held to. The head's input rows are the C cross-entropy
    positions first, then the R KL positions (the `references` rows, in the same order).

    `targets` [C]: the tokens the cross-entropy positions predict (averaged over C).
    `kl_weights` [R]: each KL position's weight, already divided by the count the sum is
    averaged over. `avoid_at` [A] (indices into the R KL positions), `avoid_tokens` [A],
    `avoid_weights` [A]: the unlikelihood terms, their weights likewise divided."""

    targets: torch.Tensor
    kl_weights: torch.Tensor
    avoid_at: torch.Tensor
    avoid_tokens: torch.Tensor
    avoid_weights: torch.Tensor


def head_loss(
    head: torch.nn.Module, states: torch.Tensor, references: torch.Tensor, terms: HeadTerms
) -> torch.Tensor:
    """The loss of `states` [C + R, H] (their gradient flows back) through the output `head`,
    against the unedited final `references` [R, H] (constants): one head product for both,
    whose backward reads the states' rows only. The head must be frozen: no gradient reaches
    its weights."""
    if any(p.requires_grad for p in head.parameters()):
        raise ValueError("the output head must be frozen (training moves the hypernetwork only)")
    return _HeadLoss.apply(states, references, head, terms)  # type: ignore[no-any-return]


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        states: torch.Tensor,
        references: torch.Tensor,
        head: torch.nn.Module,
        terms: HeadTerms,
    ) -> torch.Tensor:
        rows = states.shape[0]
        with torch.no_grad():
            every = head(torch.cat([states, references.to(states.dtype)])).float()
            loss, gradient = loss_and_gradient(every[:rows], every[rows:], terms)
            if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
                ctx.states_gradient = _input_gradient(head, states, gradient)  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        return ctx.states_gradient * grad, None, None, None  # type: ignore[attr-defined]


def _input_gradient(
    head: torch.nn.Module, states: torch.Tensor, logits_gradient: torch.Tensor
) -> torch.Tensor:
    """d(loss)/d(states) from d(loss)/d(logits): one product with a linear head's weight (in
    any layout); any other head is run again under autograd."""
    weight = linear_weight(head)
    if weight is not None:
        return (logits_gradient.to(weight.dtype) @ weight).to(states.dtype)
    with torch.enable_grad():
        leaf = states.detach().requires_grad_()
        logits = head(leaf).float()
        (gradient,) = torch.autograd.grad(logits, leaf, logits_gradient)
    return gradient


def loss_and_gradient(
    logits: torch.Tensor, reference_logits: torch.Tensor, terms: HeadTerms
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d logits) for `logits` [C + R, V] (float32) against `reference_logits`
    [R, V]. Vocabulary-wide work is a log-softmax of each (torch fuses those) and a few
    in-place passes; the gradient is written over the edited log-probabilities."""
    kl_rows = reference_logits.shape[0]
    ce_rows = logits.shape[0] - kl_rows
    log_q = logits.log_softmax(-1)  # [C + R, V]
    loss = log_q.new_zeros(())
    if ce_rows:
        loss = loss - log_q[:ce_rows].gather(-1, terms.targets[:, None]).mean()
    if kl_rows:
        log_p = reference_logits.log_softmax(-1)
        difference = log_p - log_q[ce_rows:]
        p = log_p.exp_()
        kl = difference.mul_(p).sum(-1)  # sum p (log p - log q)
        del difference
        loss = loss + (terms.kl_weights * kl).sum()
    avoided = terms.avoid_at.numel() > 0
    if avoided:
        at = terms.avoid_at + ce_rows
        said = log_q[at, terms.avoid_tokens].exp()
        unclamped = said < _MAX_AVOIDED
        loss = loss - (terms.avoid_weights * torch.log1p(-said.clamp(max=_MAX_AVOIDED))).sum()
    gradient = log_q.exp_()  # the softmax q; each term's gradient is q less its target
    if avoided:
        # d -log(1 - q_t) / d logit = q_t / (1 - q_t) (onehot_t - q), 0 where q_t is clamped
        scale = terms.avoid_weights * said / (1 - said.clamp(max=_MAX_AVOIDED)) * unclamped
        avoid_gradient = -scale[:, None] * gradient[at]
        avoid_gradient[torch.arange(len(at), device=at.device), terms.avoid_tokens] += scale
    if kl_rows:
        gradient[ce_rows:].sub_(p).mul_(terms.kl_weights[:, None])  # w (q - p)
    if ce_rows:
        ce = gradient[:ce_rows]
        ce[torch.arange(ce_rows, device=ce.device), terms.targets] -= 1
        ce.div_(ce_rows)
    if avoided:
        gradient.index_add_(0, at, avoid_gradient)
    return loss, gradient
