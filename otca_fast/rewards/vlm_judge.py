"""``vlm_judge``: a vision-language model asked about each clip through an OpenAI-compatible chat-completions
endpoint (what ``vllm serve`` exposes; Flow-Factory's VLM-as-judge, UnifiedReward's serving style).

Per clip, ``frames`` evenly spaced frames (first and last included) go to ``{url}/chat/completions`` as
images (data URLs, JPEG or PNG) followed by the question (``question``, with ``{prompt}`` and ``{frames}``
filled in). The answer becomes a score in one of two ways:

* ``score: yes_probability`` (default): P(yes) / (P(yes) + P(no)) of the first answer token, from the
  ``top_logprobs`` the server returns (vLLM does). A smooth score in [0, 1], far less noisy than a
  sampled answer.
* ``score: number``: the first number of the answer, mapped from ``number_range`` (default [0, 10]) to
  [0, 1]; a number outside the range is an error.

The clips of a batch are sent concurrently (``concurrency`` requests in flight; vLLM batches them on its
side). An answer that cannot be turned into a score is an error naming the sample; a server that does not
answer gets ``retries`` more attempts, then an error naming the URL. At build time ``{url}/models`` is
asked once, so a judge that is down (or does not serve ``model``) fails the run before its first step.
"""

from __future__ import annotations

import base64
import io
import math
import re
import string
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from otca_fast import checks
from otca_fast.rewards._http import HttpClient, ServerUnavailable, bearer_token, describe
from otca_fast.rewards._image import check_option, frame_index, quantize
from otca_fast.rewards.registry import ROLES, Reward, RewardCallError, check_frames, register_reward

__all__ = ["vlm_judge", "VLMJudge", "DEFAULT_QUESTIONS"]

DEFAULT_QUESTIONS = {
    "yes_probability": 'These {frames} image(s) are the frames of one generated clip, in order. Does the clip show '
                       '"{prompt}"? Answer yes or no.',
    "number": 'These {frames} image(s) are the frames of one generated clip, in order. On a scale from 0 to 10, how '
              'well does the clip show "{prompt}"? Answer with the number only.',
}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_STRIP = string.whitespace + string.punctuation + "▁Ġ"   # sentencepiece / byte-BPE word markers too


def _normalise_token(token: str) -> str:
    return token.strip(_STRIP).lower()


class VLMJudge:
    """The judge's call ``(frames, prompts) -> [B]`` (built by :func:`vlm_judge`, which checks the options)."""

    def __init__(self, *, url: str, model: str, question: str, system: str | None, frames: int, score: str,
                 number_range: tuple[float, float], yes_tokens: Sequence[str], no_tokens: Sequence[str],
                 top_logprobs: int, max_tokens: int, temperature: float, image_format: str, jpeg_quality: int,
                 max_side: int | None, concurrency: int, http: HttpClient, extra_body: Mapping[str, Any]) -> None:
        self.url, self.model, self.question, self.system = url, model, question, system
        self.frames, self.score_mode, self.number_range = frames, score, number_range
        self.yes = {_normalise_token(t) for t in yes_tokens}
        self.no = {_normalise_token(t) for t in no_tokens}
        self.top_logprobs, self.max_tokens, self.temperature = top_logprobs, max_tokens, temperature
        self.image_format, self.jpeg_quality, self.max_side = image_format, jpeg_quality, max_side
        self.concurrency, self.http, self.extra_body = concurrency, http, dict(extra_body)

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = check_frames(frames, prompts)
        idx = frame_index(frames.shape[1], self.frames).to(frames.device)
        pixels = quantize(frames.index_select(1, idx)).permute(0, 1, 3, 4, 2).cpu().numpy()   # [B, n, H, W, 3]
        workers = max(1, min(self.concurrency, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otca-vlm-judge") as pool:
            futures = [pool.submit(self._judge, clip, prompt) for clip, prompt in zip(pixels, prompts)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result())
                except Exception as e:  # noqa: BLE001 - reported below with the sample it belongs to
                    outcomes.append(e)
        failures = [(i, e) for i, e in enumerate(outcomes) if isinstance(e, Exception)]
        if failures:
            i, error = failures[0]
            if all(isinstance(e, ServerUnavailable) for _, e in failures) and len(failures) == len(outcomes):
                raise RewardCallError(f"the judge {error}", None)   # the server, not a sample, is to blame
            raise RewardCallError(f"{type(error).__name__}: {error}", i)
        return torch.tensor(outcomes, dtype=torch.float64)

    # --- one clip -------------------------------------------------------------------------------------

    def _image_url(self, frame) -> str:
        from PIL import Image

        image = Image.fromarray(frame)
        if self.max_side is not None and max(image.size) > self.max_side:
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        if self.image_format == "jpeg":
            image.save(buffer, format="JPEG", quality=self.jpeg_quality)
        else:
            image.save(buffer, format="PNG")
        return f"data:image/{self.image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}"

    def request_body(self, clip, prompt: str) -> dict[str, Any]:
        """The chat-completions request for one clip ``[n, H, W, 3]`` uint8."""
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": self._image_url(f)}} for f in clip]
        content.append({"type": "text", "text": self.question.format(prompt=prompt, frames=len(clip))})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        if self.score_mode == "yes_probability":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    def _judge(self, clip, prompt: str) -> float:
        response = self.http.request("POST", f"{self.url}/chat/completions", json=self.request_body(clip, prompt))
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}/chat/completions answered HTTP {response.status_code}: "
                               f"{describe(response)}")
        try:
            choice = response.json()["choices"][0]
            answer = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{self.url}/chat/completions sent no choices[0].message.content ({e})") from None
        if self.score_mode == "number":
            return self._number(answer)
        return self._yes_probability(choice, answer)

    def _number(self, answer: str) -> float:
        match = _NUMBER.search(answer)
        if match is None:
            raise ValueError(f"the answer {answer!r} holds no number (score: number)")
        value = float(match.group())
        lo, hi = self.number_range
        if not lo <= value <= hi:
            raise ValueError(f"the answer {answer!r} gives {value:g}, outside number_range [{lo:g}, {hi:g}]")
        return (value - lo) / (hi - lo)

    def _yes_probability(self, choice: Mapping[str, Any], answer: str) -> float:
        try:
            first = choice["logprobs"]["content"][0]
        except (KeyError, IndexError, TypeError):
            raise ValueError("the server returned no logprobs for the answer; score: yes_probability needs "
                             "logprobs/top_logprobs (vLLM's OpenAI server returns them), or use score: number"
                             ) from None
        candidates = {first.get("token", ""): first.get("logprob")}
        candidates.update({c.get("token", ""): c.get("logprob") for c in first.get("top_logprobs") or []})
        p_yes = p_no = 0.0
        for token, logprob in candidates.items():
            if not isinstance(logprob, (int, float)):
                continue
            word = _normalise_token(str(token))
            if word in self.yes:
                p_yes += math.exp(logprob)
            elif word in self.no:
                p_no += math.exp(logprob)
        if p_yes + p_no == 0:
            shown = sorted(candidates, key=lambda t: -(candidates[t] or -math.inf))[:5]
            raise ValueError(f"neither {sorted(self.yes)} nor {sorted(self.no)} is among the first token's "
                             f"{len(candidates)} most likely tokens {shown} (answer {answer!r}); ask a yes/no question "
                             f"or set yes_tokens / no_tokens")
        return p_yes / (p_yes + p_no)


def _models(http: HttpClient, url: str) -> list[str]:
    try:
        response = http.request("GET", f"{url}/models", timeout_s=min(http.timeout_s, 30.0))
    except ServerUnavailable as e:
        raise ServerUnavailable(f"vlm_judge: the judge server {e}; start it (e.g. `vllm serve MODEL`) or fix "
                                f"options.url (the API root, ending in /v1)") from None
    if response.status_code != 200:
        raise ValueError(f"vlm_judge: {url}/models answered HTTP {response.status_code}: {describe(response)} "
                         f"(set check: false for a server without /models)")
    try:
        return [str(m["id"]) for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"vlm_judge: {url}/models did not list models as the OpenAI API does ({e})") from None


@register_reward("vlm_judge", role="alignment", cheap=False)
def vlm_judge(*, url: str, model: str | None = None, question: str | None = None, system: str | None = None,
              frames: int = 4, score: str = "yes_probability", number_range: Sequence[float] = (0.0, 10.0),
              yes_tokens: Sequence[str] = ("yes",), no_tokens: Sequence[str] = ("no",), top_logprobs: int = 20,
              max_tokens: int | None = None, temperature: float = 0.0, image_format: str = "jpeg",
              jpeg_quality: int = 95, max_side: int | None = None, concurrency: int = 8, timeout_s: float = 120.0,
              retries: int = 3, retry_backoff_s: float = 1.0, api_key_env: str | None = "OPENAI_API_KEY",
              extra_body: Mapping[str, Any] | None = None, check: bool = True, role: str = "alignment",
              cheap: bool = False) -> Reward:
    """A VLM judge over an OpenAI-compatible API at ``url`` (the root, e.g. ``http://127.0.0.1:8001/v1``);
    see the module docstring and docs/rewards.md for every option."""
    name = "vlm_judge"
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"vlm_judge: url: expected the API root 'http://host:port/v1', got {url!r}")
    url = url.rstrip("/")
    checks.choice("vlm_judge: score", score, list(DEFAULT_QUESTIONS))
    question = DEFAULT_QUESTIONS[score] if question is None else question
    if not isinstance(question, str) or not question.strip():
        raise TypeError(f"vlm_judge: question: expected a non-empty template str, got {question!r}")
    try:
        question.format(prompt="p", frames=1)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"vlm_judge: question: a template may use {{prompt}} and {{frames}} only; "
                         f"{question!r} fails ({type(e).__name__}: {e})") from None
    check_option(frames, "frames", kind=int, lo=1, reward=name)
    if (not isinstance(number_range, Sequence) or len(number_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in number_range)
            or not number_range[0] < number_range[1]):
        raise ValueError(f"vlm_judge: number_range: expected [lo, hi] with lo < hi, got {number_range!r}")
    for option, tokens in (("yes_tokens", yes_tokens), ("no_tokens", no_tokens)):
        if isinstance(tokens, str) or not tokens or not all(isinstance(t, str) and _normalise_token(t) for t in tokens):
            raise ValueError(f"vlm_judge: {option}: expected a non-empty list of words, got {tokens!r}")
    check_option(top_logprobs, "top_logprobs", kind=int, lo=1, hi=20, reward=name)
    max_tokens = (1 if score == "yes_probability" else 16) if max_tokens is None else max_tokens
    check_option(max_tokens, "max_tokens", kind=int, lo=1, reward=name)
    check_option(temperature, "temperature", kind=(int, float), lo=0, reward=name)
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"vlm_judge: image_format: expected 'jpeg' or 'png', got {image_format!r}")
    check_option(jpeg_quality, "jpeg_quality", kind=int, lo=1, hi=100, reward=name)
    check_option(max_side, "max_side", kind=int, lo=16, allow_none=True, reward=name)
    check_option(concurrency, "concurrency", kind=int, lo=1, reward=name)
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise TypeError(f"vlm_judge: extra_body: expected a mapping merged into each request, got {extra_body!r}")
    checks.choice("vlm_judge: role", role, list(ROLES))
    checks.boolean("vlm_judge: cheap", cheap)
    http = HttpClient(timeout_s=timeout_s, retries=retries, retry_backoff_s=retry_backoff_s,
                      token=bearer_token(api_key_env, "vlm_judge: api_key_env"), what=name)
    if check:
        served = _models(http, url)
        if model is None:
            if len(served) != 1:
                raise ValueError(f"vlm_judge: model: {url} serves {served}; name the one to ask with options.model")
            model = served[0]
        elif model not in served:
            raise ValueError(f"vlm_judge: model: {url} does not serve {model!r}; it serves {served}")
    elif model is None:
        raise ValueError("vlm_judge: model: required when check is false (the name the server serves the model under)")
    fn = VLMJudge(url=url, model=model, question=question, system=system, frames=frames, score=score,
                  number_range=(float(number_range[0]), float(number_range[1])), yes_tokens=yes_tokens,
                  no_tokens=no_tokens, top_logprobs=top_logprobs, max_tokens=max_tokens, temperature=float(temperature),
                  image_format=image_format, jpeg_quality=jpeg_quality, max_side=max_side, concurrency=concurrency,
                  http=http, extra_body=extra_body or {})
    return Reward(name=name, role=role, cheap=cheap, fn=fn)
