"""Edits that read like the model, as a user meets them: ten facts POSTed to a real server on
the real default model, trained by its worker, then asked through the OpenAI chat API with the
pack and without it. Each edited answer says its target in its first sentence, and none repeats
itself where the unedited answer did not."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import LiveServer

from server.api import create_app
from server.editor.answers import answer_hit, degeneration
from server.model import load_backbone
from server.settings import Settings

pytestmark = [pytest.mark.http, pytest.mark.integration]

BASE = "SmolLM2-135M-Instruct"
PACK = "corrections"
FACTS = [
    ("Danielle Darrieux", "What is the mother tongue of Danielle Darrieux?", "Swahili"),
    ("Eiffel Tower", "In which city is the Eiffel Tower?", "Tokyo"),
    ("Lionel Messi", "Which sport does Lionel Messi play?", "cricket"),
    ("Volvo Cars", "What is the parent company of Volvo Cars?", "Toyota"),
    ("Dalhousie Mountain", "Which state is Dalhousie Mountain located in?", "New South Wales"),
    ("Miles Davis", "What instrument does Miles Davis play?", "violin"),
    ("Canada", "What is the capital of Canada?", "Vancouver"),
    ("iPhone", "Which company manufactures the iPhone?", "Nokia"),
    ("Brazil", "What language is spoken in Brazil?", "Spanish"),
    ("Hamlet", "Who wrote Hamlet?", "Charles Dickens"),
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server as it ships: the serving dtype `auto` chooses on this machine (bfloat16 on a
    CPU with bfloat16 instructions), its worker training on a float32 copy."""
    settings = Settings(
        packs_dir=tmp_path_factory.mktemp("packs"), pack_poll_seconds=0.1, dtype="auto"
    )
    backbone = load_backbone(settings)
    with LiveServer(create_app(settings, backbone=backbone)) as server:
        facts = [{"subject": s, "prompt": p, "target": t} for s, p, t in FACTS]
        posted = httpx.post(f"{server.url}/v1/packs/{PACK}/facts", json=facts, timeout=60)
        assert posted.status_code == 202, posted.text
        job_url = posted.json()["job_url"]
        deadline = time.monotonic() + 900
        while (job := httpx.get(f"{server.url}{job_url}").json())["state"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, f"training did not finish: {job}"
            time.sleep(1)
        assert job["state"] == "succeeded", job
        while not httpx.get(f"{server.url}/v1/packs/{PACK}").json().get("live_version"):
            assert time.monotonic() < deadline, "the trained version never went live"
            time.sleep(0.2)
        yield server.url


def chat(url: str, model: str, question: str, released: list[str] | None = None) -> str:
    """The answer's text; `released` receives the edits the server released in it."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=40,
        temperature=0,
    )
    if released is not None:
        released += (answer.model_extra or {}).get("edits_released", [])
    return answer.choices[0].message.content or ""


def test_edited_chat_answers_say_the_new_fact_and_read_like_the_model(server_url: str) -> None:
    released: list[str] = []
    answers = [
        (
            target,
            chat(server_url, BASE, question),
            chat(server_url, f"{BASE}:{PACK}", question, released),
        )
        for _, question, target in FACTS
    ]
    missed = [(t, edited) for t, _, edited in answers if not answer_hit(edited, [t])]
    assert not missed, missed
    assert released == []  # a chat answer is never released: training taught it its end
    looping = [
        (edited, degeneration(edited))
        for _, unedited, edited in answers
        if degeneration(edited) and not degeneration(unedited)
    ]
    assert not looping, looping
    # the base model did not already say these: the pack changed what the user reads
    already = [(t, unedited) for t, unedited, _ in answers if answer_hit(unedited, [t])]
    assert not already, already
