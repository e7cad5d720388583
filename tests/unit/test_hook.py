"""The edit hook on tiny real models: exactness where nothing is edited, batch == alone."""

import threading
from pathlib import Path

import pytest
import torch

from server.model import Backbone, load_backbone
from server.model.hook import EditPlan
from server.settings import Settings

LAYER = 1


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def backbone(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs[request.param], device="cpu"))


def _plan(edits: list[tuple[int, int, torch.Tensor]], backbone: Backbone) -> EditPlan:
    return EditPlan.build(edits, hidden_size=backbone.hidden_size, device=backbone.device)


def _logits(backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, plan: EditPlan | None):  # type: ignore[no-untyped-def]
    with torch.inference_mode(), backbone.edit_hooks.at(LAYER).plan(plan):
        return backbone.model(input_ids=ids, attention_mask=mask).logits


def test_no_plan_and_empty_plan_are_bit_identical(backbone: Backbone) -> None:
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        reference = backbone.model(input_ids=ids, attention_mask=mask).logits
    backbone.edit_hooks.at(LAYER)  # the hook exists from now on
    assert torch.equal(_logits(backbone, ids, mask, None), reference)
    assert torch.equal(_logits(backbone, ids, mask, _plan([], backbone)), reference)
    zero = _plan([(0, 2, torch.zeros(backbone.hidden_size))], backbone)
    assert torch.equal(_logits(backbone, ids, mask, zero), reference)


def test_plan_changes_only_positions_from_the_edit_on(backbone: Backbone) -> None:
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    plain = _logits(backbone, ids, mask, None)
    delta = torch.randn(backbone.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    edited = _logits(backbone, ids, mask, _plan([(0, 2, delta)], backbone))
    assert torch.equal(edited[0, :2], plain[0, :2])  # causal: earlier positions cannot see it
    assert not torch.allclose(edited[0, 2:], plain[0, 2:])


def test_plan_is_spent_after_one_pass(backbone: Backbone) -> None:
    ids = torch.tensor([[3, 4, 5]])
    mask = torch.ones_like(ids)
    delta = torch.full((backbone.hidden_size,), 3.0)
    hook = backbone.edit_hooks.at(LAYER)
    with torch.inference_mode(), hook.plan(_plan([(0, 1, delta)], backbone)):
        first = backbone.model(input_ids=ids, attention_mask=mask).logits
        second = backbone.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(first, second)
    assert torch.equal(second, _logits(backbone, ids, mask, None))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mixed_batch_equals_each_row_alone(backbone: Backbone, padding_side: str) -> None:
    """Rows with an edit, another edit and none, of different lengths, padded either side."""
    generator = torch.Generator().manual_seed(1)
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
    edits = {
        0: (3, torch.randn(backbone.hidden_size, generator=generator) * 4),
        2: (1, torch.randn(backbone.hidden_size, generator=generator) * 4),
    }
    alone = []
    for r, row in enumerate(rows):
        ids = torch.tensor([row])
        plan = _plan([(0, edits[r][0], edits[r][1])], backbone) if r in edits else None
        alone.append(_logits(backbone, ids, torch.ones_like(ids), plan)[0])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), 1)
    mask = torch.zeros_like(ids)
    batch_edits = []
    for r, row in enumerate(rows):
        pad = width - len(row)
        offset = pad if padding_side == "left" else 0
        ids[r, offset : offset + len(row)] = torch.tensor(row)
        mask[r, offset : offset + len(row)] = 1
        if r in edits:
            batch_edits.append((r, offset + edits[r][0], edits[r][1]))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode(), backbone.edit_hooks.at(LAYER).plan(_plan(batch_edits, backbone)):
        batched = backbone.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids
        ).logits
    for r, row in enumerate(rows):
        offset = width - len(row) if padding_side == "left" else 0
        torch.testing.assert_close(
            batched[r, offset : offset + len(row)], alone[r], atol=1e-4, rtol=1e-4
        )


def test_plans_are_per_thread(backbone: Backbone) -> None:
    """A plan set in one thread never reaches a forward pass of another."""
    ids = torch.tensor([[3, 4, 5]])
    mask = torch.ones_like(ids)
    plain = _logits(backbone, ids, mask, None)
    seen: list[torch.Tensor] = []
    hook = backbone.edit_hooks.at(LAYER)
    with hook.plan(_plan([(0, 1, torch.full((backbone.hidden_size,), 9.0))], backbone)):
        thread = threading.Thread(target=lambda: seen.append(_logits(backbone, ids, mask, None)))
        thread.start()
        thread.join()
    assert torch.equal(seen[0], plain)
