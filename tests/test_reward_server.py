"""The reward server (``python -m otca_fast.rewards.serve``) and its client, the ``remote`` reward, on localhost:
scores equal the in-process ones exactly, malformed requests and wrong tokens get a 4xx and a message,
concurrent requests are merged, and the trainer runs, fails and resumes with remote rewards."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from reward_servers import reward_server
from safetensors.torch import save
from test_trainer import small

from otca_fast import checkpoint as ckpt
from otca_fast.config import ConfigError, load_config
from otca_fast.rewards import Reward, RewardError, build_reward, score_metrics, score_rewards
from otca_fast.rewards.protocol import CONTENT_TYPE, encode_request
from otca_fast.rewards.serve import RewardServer, build_served_rewards, main, parse_options
from otca_fast.toy.world import sample_clips
from otca_fast.train import main as train_main
from otca_fast.trainer import TIMING_KEYS, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_video.yaml"
TOKEN = "s3cret-token"
SHAPES = ["shapes_quality", "shapes_motion", "shapes_alignment"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: the three shapes rewards, the eval-only shapes exam and a user reward that
    returns NaN for red prompts; a token; requests limited to 1 MiB."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with reward_server(log, *[a for name in [*SHAPES, "shapes_exam", "reward_servers:nan_for_red"]
                              for a in ("--reward", name)], "--max-request-mb", "1", token=TOKEN) as srv:
        yield srv


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("OTCA_REWARD_TOKEN", TOKEN)


def world_clips(n: int, seed: int = 0, noise: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    clips = sample_clips(n, generator=torch.Generator().manual_seed(seed))
    frames = clips.frames
    if noise:
        frames = (frames + noise * torch.randn(frames.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    return frames, list(clips.prompts)


def remote(url: str, name: str, **options) -> Reward:
    return build_reward("remote", url=url, reward=name, **options)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------------------
# what the server serves, and the scores
# ------------------------------------------------------------------------------------------------

def test_health_lists_the_served_rewards_with_roles_and_cost_flags(server, token):
    info = requests.get(f"{server.url}/health", headers=_auth(), timeout=30).json()
    assert info["status"] == "ok" and info["auth"] is True and info["device"] == "cpu"
    assert info["rewards"]["shapes_motion"] == {"role": "motion", "cheap": True, "eval_only": False, "headline": None}
    assert info["rewards"]["shapes_exam"] == {"role": "custom", "cheap": False, "eval_only": True,
                                              "headline": "all_correct"}
    assert info["rewards"]["reward_servers:nan_for_red"]["role"] == "custom"
    # the remote reward takes the served reward's name, role, cost flag and eval-only flag; role/cheap overridable
    motion = remote(server.url, "shapes_motion")
    assert (motion.name, motion.role, motion.cheap, motion.eval_only) == ("shapes_motion", "motion", True, False)
    exam = remote(server.url, "shapes_exam")
    assert exam.eval_only and exam.headline == "all_correct"
    custom = remote(server.url, "shapes_motion", role="quality", cheap=False)
    assert (custom.role, custom.cheap) == ("quality", False)
    with pytest.raises(ValueError, match=r"does not serve 'clip_score'; it serves \['reward_servers:nan_for_red', "):
        remote(server.url, "clip_score")


def test_served_scores_equal_the_in_process_scores_exactly(server, token):
    local = build_served_rewards([*SHAPES, "shapes_exam"])
    # 8-bit frames travel as uint8 and come back as the same floats: identical scores
    frames, prompts = world_clips(5, noise=0.05)
    frames = (frames * 255).round() / 255
    served = [remote(server.url, name) for name in SHAPES]
    before = server.requests_logged()
    scores = score_rewards(served, frames, prompts, step=3)
    assert server.requests_logged() == before + 1   # three rewards of one server: one request, frames sent once
    assert torch.equal(scores, score_rewards([local[n] for n in SHAPES], frames, prompts, step=3))
    assert scores.std(0).min() > 0   # the clips differ: the comparison is not between constants
    # any float frames, sent as float32: identical scores too
    frames, prompts = world_clips(4, seed=1, noise=0.03)
    served32 = [remote(server.url, name, frames_dtype="float32") for name in SHAPES]
    assert torch.equal(score_rewards(served32, frames, prompts, step=0),
                       score_rewards([local[n] for n in SHAPES], frames, prompts, step=0))
    # a multi-part eval-only metric through remote: every part and the headline
    exam = score_metrics([remote(server.url, "shapes_exam")], frames, prompts, step=0)
    expected = score_metrics([local["shapes_exam"]], frames, prompts, step=0)
    assert exam.keys() == expected.keys() and "shapes_exam/all_correct" in exam
    assert all(torch.equal(exam[k], expected[k]) for k in expected)


def test_a_failing_served_reward_names_the_prompt_and_the_server(server, token):
    frames, _ = world_clips(3)
    prompts = ["a blue circle moving up on a white background", "a red square moving left on a black background",
               "a green circle moving left on a checkered background"]
    name = "reward_servers:nan_for_red"
    with pytest.raises(RewardError) as info:
        score_rewards([remote(server.url, "shapes_motion"), remote(server.url, name)], frames, prompts, step=7)
    e = info.value
    assert (e.reward, e.index, e.prompt, e.step) == (name, 1, prompts[1], 7)
    assert server.url in str(e) and "non-finite score nan for sample 1" in str(e)


# ------------------------------------------------------------------------------------------------
# bad requests, tokens, a server that is down
# ------------------------------------------------------------------------------------------------

def _raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         send_body: bool = True) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path)
        for k, v in {**_auth(), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body is not None and send_body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        conn.close()


def _body(frames: torch.Tensor, prompts, rewards=("shapes_motion",), name: str = "frames") -> bytes:
    metadata = {"prompts": json.dumps(prompts) if not isinstance(prompts, str) else prompts,
                "rewards": json.dumps(list(rewards))}
    return save({name: frames.contiguous()}, metadata=metadata)


def test_bad_requests_get_a_4xx_and_a_message_and_the_server_keeps_serving(server):
    frames = torch.zeros(2, 3, 3, 8, 8, dtype=torch.uint8)
    ok_prompts = ["a red square moving left on a black background"] * 2
    ct = {"Content-Type": CONTENT_TYPE}

    def post(body: bytes, headers=None):
        return _raw(server.url, "POST", "/score", body, {**ct, "Content-Length": str(len(body)), **(headers or {})})

    cases = [
        (_raw(server.url, "GET", "/nope"), 404, "no such path '/nope'"),
        (_raw(server.url, "GET", "/score"), 405, "POST /score"),
        (_raw(server.url, "POST", "/health", b"", {"Content-Length": "0"}), 405, "GET /health"),
        (_raw(server.url, "POST", "/score", None, ct), 411, "Content-Length header is required"),
        # 2 MiB announced, nothing sent: refused before the body is read
        (_raw(server.url, "POST", "/score", None, {**ct, "Content-Length": str(2 * 2**20)}), 413,
         "exceeds the server's limit of 1048576 bytes"),
        (post(b"x" * 100, {"Content-Type": "application/json"}), 415, "expected application/x-otca-frames"),
        (post(b"not a safetensors file at all"), 400, "safetensors header claims"),
        (post(_body(frames, ok_prompts, name="pixels")), 400, "exactly one tensor named 'frames', got ['pixels']"),
        (post(_body(frames[:, 0], ok_prompts)), 400, "expected shape [B, F, 3, H, W]"),
        (post(_body(frames.int(), ok_prompts)), 400, "expected dtype uint8 | float16 | float32, got torch.int32"),
        (post(_body(frames, ok_prompts[:1])), 400, "prompts: expected 2 (one per clip of frames), got 1"),
        (post(_body(frames, "[not json")), 400, "metadata['prompts']: expected a JSON list of strings"),
        (post(_body(frames.float().fill_(float("nan")), ok_prompts)), 400, "frames: contain NaN or Inf"),
        (post(_body(frames.float() + 2, ok_prompts)), 400, "expected values in [0, 1], got [2, 2]"),
        (post(_body(frames, ok_prompts, rewards=())), 400, "expected a non-empty list of distinct names"),
        (post(_body(frames, ok_prompts, rewards=("clip_score",))), 404, "not served here: ['clip_score']"),
    ]
    for (status, message), want_status, want in cases:
        assert status == want_status and want in message, (status, message, want)
    # a body that ends early (the client closes its side)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/score")
    for k, v in {**_auth(), **ct, "Content-Length": "1000"}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b"y" * 10)
    conn.sock.shutdown(1)
    response = conn.getresponse()
    assert response.status == 400 and "ended after 10 of 1000 bytes" in json.loads(response.read())["error"]
    conn.close()
    # never a crash: the server still scores
    assert server.proc.poll() is None
    status = requests.post(f"{server.url}/score", data=_body(frames, ok_prompts), headers={**ct, **_auth()},
                           timeout=60)
    assert status.status_code == 200 and len(status.json()["results"]["shapes_motion"]["scores"]) == 2


def test_a_wrong_or_missing_token_is_refused(server, monkeypatch):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path in (("GET", "/health"), ("POST", "/score")):
            response = requests.request(method, f"{server.url}{path}", headers=headers, data=b"12345678", timeout=30)
            assert response.status_code == 401 and "missing or wrong bearer token" in response.json()["error"]
            assert response.headers["WWW-Authenticate"] == "Bearer"
    monkeypatch.setenv("OTCA_REWARD_TOKEN", "wrong")
    with pytest.raises(ValueError, match=rf"reward server at {re.escape(server.url)} refused the bearer token"):
        remote(server.url, "shapes_motion")
    monkeypatch.delenv("OTCA_REWARD_TOKEN")
    with pytest.raises(ValueError, match="refused the bearer token"):
        remote(server.url, "shapes_motion")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_fails_the_build_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match=rf"reward server {re.escape(url)}/health did not answer after 2 "
                                              r"attempt\(s\).*Connection refused"):
        remote(url, "shapes_motion", retries=1, retry_backoff_s=0.01)
    with pytest.raises(ValueError, match="url: expected 'http://host:port' of a reward server"):
        remote("127.0.0.1:8000", "shapes_motion")


def test_the_command_line_checks_its_arguments(capsys):
    assert parse_options(["a"], '{"fps": 16}') == {"a": {"fps": 16}}
    assert parse_options(["a", "b"], '{"b": {"fps": 16}}') == {"a": {}, "b": {"fps": 16}}
    assert parse_options(["a"], '{"a": {"x": 1}}') == {"a": {"x": 1}}
    with pytest.raises(ValueError, match=r"keyed by reward name.*got keys \['fps'\] that are not served"):
        parse_options(["a", "b"], '{"fps": 16}')
    with pytest.raises(ValueError, match="expected a JSON object, got invalid JSON"):
        parse_options(["a"], "{fps: 16}")
    assert main(["--reward", "no_such_reward", "--port", "0"]) == 2
    assert "--reward no_such_reward: build_reward: unknown reward 'no_such_reward'" in capsys.readouterr().err
    assert main(["--reward", "brightness", "--options", '{"target": 2, "extra": 1}', "--port", "0"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert main(["--port", "0"]) == 2
    assert "expected at least one reward" in capsys.readouterr().err
    assert main(["--reward", "brightness", "--threads", "0", "--port", "0"]) == 2
    assert "--threads: expected >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# concurrent requests are merged (an in-process server: the test controls when the worker runs)
# ------------------------------------------------------------------------------------------------

def test_concurrent_requests_are_merged_and_a_failure_is_kept_to_its_own_request():
    release, calls = threading.Event(), []

    def brightness(frames, prompts):
        calls.append(len(prompts))
        if len(calls) == 1:
            release.wait(timeout=120)   # hold the worker while the other requests queue up
        if "bad" in prompts:
            raise ValueError("cannot score a bad prompt")
        return frames.mean(dim=(1, 2, 3, 4))

    with RewardServer({"probe": Reward("probe", "quality", True, brightness)}, port=0).start() as srv:
        reward = remote(srv.url, "probe", retries=0, frames_dtype="float32")
        batches = {name: (torch.rand(n, 2, 3, 4, 4), [name] * n) for name, n in (("a", 2), ("b", 3), ("bad", 1))}
        results: dict[str, object] = {}

        def call(name):
            frames, prompts = batches[name]
            try:
                results[name] = reward.fn(frames, prompts)
            except Exception as e:  # noqa: BLE001 - inspected below
                results[name] = e

        threads = {name: threading.Thread(target=call, args=(name,)) for name in batches}
        threads["a"].start()
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        threads["b"].start()
        threads["bad"].start()
        while srv.pending() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.pending() == 2
        release.set()
        for t in threads.values():
            t.join(timeout=120)
    # a alone (the worker was idle); b and bad merged into one call of 4, which failed, then each alone (in the
    # order they arrived)
    assert calls[:2] == [2, 4] and sorted(calls[2:]) == [1, 3]
    for name in ("a", "b"):
        frames, _ = batches[name]
        assert torch.equal(results[name], frames.float().mean(dim=(1, 2, 3, 4)).double())
    error = results["bad"]
    assert error.index == 0 and "ValueError: cannot score a bad prompt" in str(error)


# ------------------------------------------------------------------------------------------------
# the trainer with remote rewards
# ------------------------------------------------------------------------------------------------

def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_main_job_with_a_remote_reward_and_a_remote_eval_metric_equals_in_process(server, token, tmp_path):
    extra = {"train.max_steps": 2, "eval.every": 2}
    in_process = {"rewards": [{"name": n, "weight": 1.0, "options": {}} for n in SHAPES],
                  "eval.metrics": [{"name": "shapes_exam", "options": {}}]}
    served = {"rewards": [{"name": "remote", "weight": 1.0,
                           "options": {"url": server.url, "reward": "shapes_quality", "frames_dtype": "float32"}},
                          *in_process["rewards"][1:]],
              "eval.metrics": [{"name": "remote", "options": {"url": server.url, "reward": "shapes_exam",
                                                              "frames_dtype": "float32"}}]}
    assert train_main([str(TINY), *small(tmp_path / "local", **extra, **in_process)]) == 0
    before = server.requests_logged()
    assert train_main([str(TINY), *small(tmp_path / "remote", **extra, **served)]) == 0
    assert server.requests_logged() > before
    local, remote_records = _records(tmp_path / "local"), _records(tmp_path / "remote")
    assert [r["step"] for r in remote_records] == [0, 1, 2, 2]
    assert "reward/shapes_quality" in remote_records[1] and "eval/metric/shapes_exam/all_correct" in remote_records[0]
    assert remote_records == local   # same rewards, same metrics, same losses: served exactly as in process


def test_a_served_eval_only_metric_is_refused_as_a_trained_reward(server, token, tmp_path):
    cfg = load_config(TINY, [a for a in small(tmp_path / "r", rewards=[
        {"name": "remote", "weight": 1.0, "options": {"url": server.url, "reward": "shapes_exam"}}],
        **{"eval.metrics": []}) if a != "--set"])
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(remote\): an eval-only metric is never trained on"):
        Trainer(cfg)


def test_a_reward_server_down_at_start_fails_before_the_first_step(tmp_path, capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    out = tmp_path / "down"
    rewards = [{"name": "remote", "weight": 1.0, "options": {"url": url, "reward": "shapes_quality", "retries": 0}}]
    assert train_main([str(TINY), *small(out, rewards=rewards)]) == 2
    err = capsys.readouterr().err
    assert f"rewards[0] (remote): remote: the reward server {url}/health did not answer" in err
    assert not (out / "metrics.jsonl").exists() and not ckpt.list_checkpoints(out)


def test_a_server_killed_mid_run_stops_with_the_named_error_and_resume_works(tmp_path, monkeypatch, capsys):
    log = tmp_path / "server.log"
    out = tmp_path / "run"
    with reward_server(log, "--reward", "shapes_quality") as srv:
        rewards = [{"name": "remote", "weight": 1.0, "options": {"url": srv.url, "reward": "shapes_quality",
                                                                 "retries": 1, "retry_backoff_s": 0.05}},
                   {"name": "shapes_motion", "weight": 1.0, "options": {}}]
        args = [str(TINY), *small(out, rewards=rewards, **{"train.max_steps": 3, "train.checkpoint_every": 100,
                                                             "eval.enabled": False})]
        real = Trainer.train_step

        def kill_before_step_2(self, step):
            if step == 2:
                srv.kill()
            return real(self, step)

        monkeypatch.setattr(Trainer, "train_step", kill_before_step_2)
        assert train_main(args) == 1
        port = srv.port
    err = capsys.readouterr().err
    assert "reward 'shapes_quality' failed at step 2 on the batch as a whole" in err
    assert f"the reward server {srv.url}/score did not answer after 2 attempt(s)" in err
    assert "the last good state (step 1) is checkpointed" in err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    # the server is back (same port): the run resumes from the kept checkpoint and finishes
    monkeypatch.setattr(Trainer, "train_step", real)
    with reward_server(tmp_path / "server2.log", "--reward", "shapes_quality", port=port):
        assert train_main([*args, "--resume"]) == 0
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 3]


def test_encode_request_refuses_an_unknown_transport():
    with pytest.raises(ValueError, match=r"frames_dtype: expected one of \['uint8', 'float16', 'float32'\]"):
        encode_request(torch.zeros(1, 1, 3, 2, 2), ["p"], ["r"], frames_dtype="int8")
