"""What a training run is configured by: `TrainConfig`, with the contexts an edit must survive
by default.

A module of its own because two others read it: sequences.py (which contexts and teacher
answers to train on) and train.py (the optimiser, the epochs, the loss weights). Kept in
either, the other would import it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The hypernetwork's form (hypernet.py): here, so that reading a config needs no torch.
HypernetKind = Literal["linear", "mlp", "residual"]

# Contexts the edit must survive besides the bare prompt; the chat template is added separately.
DEFAULT_PREFIXES = ("Fact: {prompt}",)
# Where a teacher answers: the chat template after the target, the chat template in its own
# sentence, the prompt as it is (sequences.py).
TEACHER_CONTEXTS = ("chat", "free", "bare")


@dataclass(frozen=True)
class TrainConfig:
    layer: int | None = None  # None: 60% of the depth (18 of 30 on the default model)
    # the linear map plus a slower MLP: on dev it said targets twice less often than the map
    # alone and generalized as well (natural_edits.md, 2p)
    hypernet: HypernetKind = "residual"
    lr: float = 2e-2  # the reference's 1e-4 does not move a zero-initialised hypernetwork here
    epochs: int = 12  # the teacher's answers need them (docs/results/natural_edits.md, 2c)
    min_steps: int = 80  # small fact sets get more epochs: Adam needs steps, not epochs
    batch_size: int = 8
    seed: int = 0
    chat_variant: bool = True
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    rephrase: bool = True  # also train the prompt's rephrasings (rephrase.py)
    delta_l2: float = 0.0  # penalty on the blocks' mean square: keeps them just large enough
    stop_loss: float = 0.02  # stop once an epoch's mean loss falls under this
    patience: int = 3  # ... or after this many epochs without improvement
    # KL(unedited || edited) on the facts' locality prompts (as the LKS reference's loss_loc),
    # over the positions that predict the unedited model's first tokens after the prompt.
    locality_weight: float = 1.0
    locality_positions: int = 3
    # KL(unedited || edited) after each fact's prompt + target, over the positions that predict
    # the unedited model's own continuation: once the new answer has been said, the block should
    # stop steering (without it, edited continuations repeat the target).
    continuation_weight: float = 0.0
    continuation_positions: int = 3
    # unlikelihood of the new target's first token at those same positions (where the unedited
    # model does not say it itself): a narrower cure for the repetition than the KL. Off by
    # default: the teacher cures the repetition, and the two pull against each other.
    repetition_weight: float = 0.0
    # KL(teacher || edited) over a teacher's answer: the unedited model, told the fact in its
    # context ("Fact: <prompt> <target>."), answers the question in its own words; the edited
    # model, asked the bare question, should answer as it does (its sentence, its end of turn).
    teacher_weight: float = 1.0
    # the same KL over the bare context's answer (a question's end of turn stays cross-entropy;
    # a statement is taught none: sequences.taught_answer), where teacher_contexts has "bare".
    # Lower: at the chat's weight it cost generality (zsRE dev 0.970 against 0.991 at 0.3;
    # docs/results/natural_edits.md, 2d).
    bare_teacher_weight: float = 0.3
    # unlikelihood of the target's first token (as a second mention says it) at the chat
    # teacher's answer positions where the teacher does not say it: the KL alone lets a chat
    # answer name the target twice ("German: German"); with it, fewer do on dev
    # (natural_edits.md, 2l)
    teacher_repetition_weight: float = 1.0
    teacher_tokens: int = 24  # the teacher's answer is cut here (its end of turn included)
    # where: "chat" (the chat template), "bare" (the prompt as it is); "free": in chat the
    # teacher answers freely (the target where it puts it) instead of after the target. Without
    # "bare", bare questions loop (released, their answers read worse: natural_edits.md, 2g)
    teacher_contexts: tuple[str, ...] = ("chat", "bare")

    def teacher_weight_in(self, context: str) -> float:
        """The KL weight of a teacher context's answer."""
        return self.bare_teacher_weight if context == "bare" else self.teacher_weight

    def resolve_layer(self, num_layers: int) -> int:
        layer = self.layer if self.layer is not None else round(0.6 * num_layers)
        assert 0 <= layer < num_layers - 1, f"edit layer {layer} must be in [0, {num_layers - 1})"
        return layer
