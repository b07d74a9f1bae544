"""The VLM judge against a fake OpenAI-compatible chat-completions server on localhost.

The fake server reads the images it is sent and answers from their mean brightness b: the first answer
token is "Yes" with probability b and "No" with 1 − b (``logprobs``), or the text "Score: 10·b". So a judge
that sends the right frames, in the right order, and turns the answer into a score gets b back."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from otca_fast.rewards import RewardError, build_reward, score_rewards

MODEL = "fake-qwen-vl"


class FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[dict] = []   # every chat request body, with the Authorization header

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({**body, "authorization": self.headers.get("Authorization")})
        content = body["messages"][-1]["content"]
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))))
                  for part in content if part["type"] == "image_url"]
        question = next(part["text"] for part in content if part["type"] == "text")
        b = float(np.mean([im.astype(np.float64).mean() / 255 for im in images]))
        if "vague" in question:
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": "hard to say"}}]})
            return
        if not body.get("logprobs"):
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"Score: {10 * b:.6f}"}}]})
            return
        top = [{"token": "Yes", "logprob": math.log(b)}, {"token": " no", "logprob": math.log(1 - b)},
               {"token": "The", "logprob": -9.0}]
        logprobs = None if "nologprobs" in question else {"content": [{"token": "Yes", "logprob": top[0]["logprob"],
                                                                       "top_logprobs": top}]}
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": "Yes"}, "logprobs": logprobs}]})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def grey_clips(levels: list[float], frames: int = 5) -> torch.Tensor:
    """Clips whose frame j of clip i is uniform grey at levels[i] + 0.02·j (on the 8-bit grid)."""
    x = torch.tensor(levels).view(-1, 1, 1, 1, 1) + 0.02 * torch.arange(frames).view(1, -1, 1, 1, 1)
    return (x.expand(-1, -1, 3, 8, 8).clamp(0, 1) * 255).round() / 255


def test_yes_probability_from_logprobs_scores_each_clip_in_order(judge_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    FakeOpenAI.requests.clear()
    judge = build_reward("vlm_judge", url=judge_url, frames=3, image_format="png", concurrency=3)
    assert (judge.name, judge.role, judge.cheap) == ("vlm_judge", "alignment", False)
    levels = [0.2, 0.5, 0.3, 0.7, 0.1]
    frames = grey_clips(levels)
    prompts = [f"prompt {i}" for i in range(len(levels))]
    scores = score_rewards([judge], frames, prompts, step=0)[:, 0]
    # frames 0, 2 and 4 of each clip are sent: their mean level is levels[i] + 0.04
    expected = torch.tensor([(frames[i, [0, 2, 4]].mean()).item() for i in range(len(levels))])
    assert torch.allclose(scores, expected, atol=1e-6), (scores, expected)
    assert len(FakeOpenAI.requests) == len(levels)
    for request in FakeOpenAI.requests:
        assert request["model"] == MODEL   # the only model the server lists
        assert request["max_tokens"] == 1 and request["logprobs"] is True and request["top_logprobs"] == 20
        assert request["temperature"] == 0.0 and request["authorization"] == "Bearer sk-test"
        content = request["messages"][-1]["content"]
        assert [part["type"] for part in content] == ["image_url"] * 3 + ["text"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    questions = sorted(r["messages"][-1]["content"][-1]["text"] for r in FakeOpenAI.requests)
    assert questions[0] == ('These 3 image(s) are the frames of one generated clip, in order. Does the clip show '
                            '"prompt 0"? Answer yes or no.')


def test_a_parsed_number_and_a_custom_question(judge_url):
    FakeOpenAI.requests.clear()
    judge = build_reward("vlm_judge", url=judge_url, model=MODEL, score="number", frames=1, image_format="png",
                         question="Rate {prompt} ({frames} frame).", system="You are a strict judge.",
                         role="quality", extra_body={"seed": 7})
    frames = grey_clips([0.25, 0.6], frames=1)
    scores = score_rewards([judge], frames, ["a", "b"], step=0)[:, 0]
    assert torch.allclose(scores, frames.mean(dim=(1, 2, 3, 4)), atol=1e-6)
    request = FakeOpenAI.requests[0]
    assert request["messages"][0] == {"role": "system", "content": "You are a strict judge."}
    assert request["max_tokens"] == 16 and "logprobs" not in request and request["seed"] == 7
    assert request["messages"][1]["content"][-1]["text"] in ("Rate a (1 frame).", "Rate b (1 frame).")


def test_answers_that_give_no_score_are_errors_naming_the_sample(judge_url):
    frames = grey_clips([0.3, 0.4, 0.5])
    number = build_reward("vlm_judge", url=judge_url, score="number", frames=2)
    with pytest.raises(RewardError) as info:
        score_rewards([number], frames, ["fine", "something vague", "fine too"], step=4)
    assert (info.value.index, info.value.prompt) == (1, "something vague")
    assert "the answer 'hard to say' holds no number" in str(info.value)
    narrow = build_reward("vlm_judge", url=judge_url, score="number", number_range=[0, 1])
    with pytest.raises(RewardError, match=r"outside number_range \[0, 1\]"):
        score_rewards([narrow], frames, ["a", "b", "c"], step=4)
    yes = build_reward("vlm_judge", url=judge_url)
    with pytest.raises(RewardError, match="the server returned no logprobs") as info:
        score_rewards([yes], frames, ["a", "b", "nologprobs please"], step=4)
    assert info.value.index == 2
    odd = build_reward("vlm_judge", url=judge_url, yes_tokens=["oui"], no_tokens=["non"])
    with pytest.raises(RewardError, match=r"neither \['oui'\] nor \['non'\] is among the first token's 3 most likely"):
        score_rewards([odd], frames[:1], ["a"], step=4)


def test_a_judge_that_is_down_or_misconfigured_fails_at_build(judge_url):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ConnectionError, match=rf"the judge server {dead}/models did not answer after 1 attempt"):
        build_reward("vlm_judge", url=dead, retries=0)
    with pytest.raises(ValueError, match=rf"does not serve 'other-model'; it serves \['{MODEL}'\]"):
        build_reward("vlm_judge", url=judge_url, model="other-model")
    with pytest.raises(ValueError, match=r"question: a template may use \{prompt\} and \{frames\} only"):
        build_reward("vlm_judge", url=judge_url, question="Is it {colour}?")
    with pytest.raises(ValueError, match="score: expected one of"):
        build_reward("vlm_judge", url=judge_url, score="stars")
    with pytest.raises(ValueError, match="model: required when check is false"):
        build_reward("vlm_judge", url=judge_url, check=False)
    with pytest.raises(TypeError, match="options .* do not fit"):
        build_reward("vlm_judge", url=judge_url, temprature=0.5)
