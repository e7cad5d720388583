"""The training loss's vocabulary-wide part: the output head over a step's predict positions
and the terms read from its logits (cross-entropy on the edits' targets, KL to the unedited
model, unlikelihood of a repeated target), computed with its gradient in one forward.

Every term's gradient with respect to the logits has a closed form (softmax minus the target
distribution, give or take a row's weight), so the forward writes it in place, and the
backward is the head's input gradient alone: autograd would keep the log-softmaxes, the KL's
elementwise terms and a zero-filled gradient for every slice taken from the logits, each as
wide as the vocabulary. The few vocabulary-wide tensors a step needs live in buffers kept
from step to step: on a CPU a fresh tensor that size pays for its pages' first touch at every
step, which made a log-softmax into a new tensor three times as slow as into a kept one.
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


class HeadLoss:
    """The loss through one frozen output `head`, with the buffers its steps reuse (grown to
    the most rows a step has had; one trainer's, not shared between threads)."""

    def __init__(self, head: torch.nn.Module) -> None:
        if any(p.requires_grad for p in head.parameters()):
            raise ValueError(
                "the output head must be frozen (training moves the hypernetwork only)"
            )
        self.head = head
        self.weight = linear_weight(head)  # None: a head run as a module, gradient by autograd
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(
        self, states: torch.Tensor, references: torch.Tensor, terms: HeadTerms
    ) -> torch.Tensor:
        """The loss of `states` [C + R, H] (their gradient flows back) against the unedited
        final `references` [R, H] (constants): one head product for both, whose backward
        reads the states' rows only."""
        return _HeadLoss.apply(states, references, self, terms)  # type: ignore[no-any-return]

    def buffer(
        self,
        name: str,
        rows: int,
        columns: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A [rows, columns] view of the buffer `name` (float32 unless `dtype`), its contents
        undefined."""
        kept = self._buffers.get(name)
        if (
            kept is None
            or kept.shape[0] < rows
            or kept.shape[1] != columns
            or kept.device != device
            or kept.dtype != dtype
        ):
            kept = torch.empty(max(rows, 1), columns, device=device, dtype=dtype)
            self._buffers[name] = kept
        return kept[:rows]

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` through the head, float32, in the "logits" buffer where the head is linear
        (the product in its weight's dtype)."""
        weight = self.weight
        if weight is None:
            return self.head(rows).float()
        out = self.buffer("logits", rows.shape[0], weight.shape[0], rows.device)
        if weight.dtype == torch.float32:
            torch.matmul(rows.float(), weight.T, out=out)
        else:  # the product in the weight's dtype, in a buffer of its own, then read as float32
            product = self.buffer(
                "product", rows.shape[0], weight.shape[0], rows.device, weight.dtype
            )
            out.copy_(torch.matmul(rows.to(weight.dtype), weight.T, out=product))
        bias = getattr(self.head, "bias", None)
        return out if bias is None else out.add_(bias)

    def input_gradient(self, states: torch.Tensor, logits_gradient: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(states) from d(loss)/d(logits): one product with a linear head's weight
        (in any layout); any other head is run again under autograd."""
        weight = self.weight
        if weight is not None:
            if weight.dtype != logits_gradient.dtype:  # rounded into the product's buffer
                rows, vocab = logits_gradient.shape
                product = self.buffer("product", rows, vocab, logits_gradient.device, weight.dtype)
                logits_gradient = product.copy_(logits_gradient)
            return (logits_gradient @ weight).to(states.dtype)
        with torch.enable_grad():
            leaf = states.detach().requires_grad_()
            logits = self.head(leaf).float()
            (gradient,) = torch.autograd.grad(logits, leaf, logits_gradient)
        return gradient

    def loss_and_gradient(
        self, logits: torch.Tensor, reference_logits: torch.Tensor, terms: HeadTerms
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, d loss / d logits) for `logits` [C + R, V] (float32) against `reference_logits`
        [R, V]: a log-softmax of each and a few in-place passes, in this loss's buffers (the
        gradient is one of them: use it before the next call)."""
        kl_rows = reference_logits.shape[0]
        ce_rows = logits.shape[0] - kl_rows
        vocab, device = logits.shape[1], logits.device
        log_q = torch.log_softmax(logits, -1, out=self.buffer("log_q", len(logits), vocab, device))
        loss = log_q.new_zeros(())
        if ce_rows:
            loss = loss - log_q[:ce_rows].gather(-1, terms.targets[:, None]).mean()
        if kl_rows:
            log_p = self.buffer("log_p", kl_rows, vocab, device)
            torch.log_softmax(reference_logits, -1, out=log_p)
            difference = self.buffer("difference", kl_rows, vocab, device)
            torch.sub(log_p, log_q[ce_rows:], out=difference)
            p = log_p.exp_()
            kl = difference.mul_(p).sum(-1)  # sum p (log p - log q)
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


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        states: torch.Tensor,
        references: torch.Tensor,
        loss_fn: HeadLoss,
        terms: HeadTerms,
    ) -> torch.Tensor:
        rows = states.shape[0]
        with torch.no_grad():
            every = loss_fn.logits(torch.cat([states, references.to(states.dtype)]))
            loss, gradient = loss_fn.loss_and_gradient(every[:rows], every[rows:], terms)
            if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
                ctx.states_gradient = loss_fn.input_gradient(states, gradient)  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        return ctx.states_gradient * grad, None, None, None  # type: ignore[attr-defined]
