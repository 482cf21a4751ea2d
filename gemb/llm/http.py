"""An LLM behind an OpenAI-compatible completions server (vLLM, llama.cpp's llama-server,
`gemb llm serve`), with the same two methods as GemmaDecoder.

generate: POST {base}/v1/completions {model, prompt, max_tokens, temperature, top_p, stop,
seed} per prompt (or per `prompts_per_request` prompts).

log_likelihood: POST {base}/v1/completions {prompt: prompt + continuation, max_tokens: 0,
echo: true, logprobs: 0}: the server returns the log-prob of every prompt token
(`choices[i].logprobs.token_logprobs`) with each token's character offset (`text_offset`);
the continuation's tokens are those whose offset is >= len(prompt), and their log-probs are
summed. A server that refuses max_tokens 0 is asked again with 1 (once; remembered), and the
generated token is left out.

Token-boundary caveat: the server tokenises prompt + continuation as ONE text, while
GemmaDecoder.log_likelihood tokenises the two apart. Where the continuation starts inside a
token of the joined text (a continuation "s" after "cat", or "Paris" glued to a prompt ending
in a word), that token is counted with the continuation when it starts at or after
len(prompt), else with the prompt, so the two backends score different tokens. Start
continuations at a word boundary (" Paris" after "...of") and they agree. Offsets are
counted in the text the server decodes; a prompt that does not survive a round trip through
the tokenizer (unknown characters, collapsed whitespace) shifts them. A constant shift (a
server that counts its BOS token's text "<bos>" in the offsets) is measured and removed.

Requests run concurrently (a thread pool of max_concurrency) and each is retried with
exponential backoff on connection errors, timeouts, 5xx and 429; any other 4xx fails at once
with the server's message (LLMRequestError); a server still unreachable after the retries
raises LLMServerUnavailable (a ConnectionError) naming the URL and the fix. Only the standard
library is used.

Sampling seeds: the request holding prompts [i, i + k) is sent seed = sampling.seed + i, so
results do not depend on concurrency or timing and equal prompts at different positions are
drawn independently (as rows of one in-process batch are).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

import numpy as np

from gemb.llm.decoder import SamplingConfig, _cut_at_stop

_RETRIED_STATUSES = (429, 500, 502, 503, 504)
_MAX_BACKOFF_S = 30.0


class LLMServerUnavailable(ConnectionError):
    """The server could not be reached (or kept failing with 5xx / 429) after all retries."""


class LLMRequestError(RuntimeError):
    """The server refused a request (4xx other than 429) or answered something unusable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class OpenAIServerLLM:
    """An OpenAI-compatible completions server as an `LLM` (gemb.llm.interface).

    Args:
      base_url: the server's root, e.g. "http://127.0.0.1:8000" (a trailing "/v1" is accepted).
      model: the model name sent with each request; None asks GET /v1/models once and uses
        the first one (servers that do not list models get none).
      max_concurrency: requests in flight at once.
      timeout_s: per request (a first request to `gemb llm serve` includes compilation).
      max_retries: retries per request after the first attempt.
      backoff_s: the first retry waits this long, each later one twice the one before.
      prompts_per_request: prompts sent in one request (a list `prompt`); 1 suits servers
        that batch requests themselves (vLLM), more suits `gemb llm serve` (one batch per
        request).
    """

    def __init__(self, base_url: str, model: str | None = None, max_concurrency: int = 8,
                 timeout_s: float = 60, max_retries: int = 4, backoff_s: float = 0.5,
                 prompts_per_request: int = 1):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://.")
        for name, value in (("max_concurrency", max_concurrency),
                            ("prompts_per_request", prompts_per_request)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("max_retries and backoff_s must be >= 0 and timeout_s > 0.")
        base_url = base_url.rstrip("/")
        self.base_url = base_url[:-3] if base_url.endswith("/v1") else base_url
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.prompts_per_request = prompts_per_request
        self._model_resolved = model is not None
        self._score_max_tokens = 0

    def __repr__(self):
        return f"OpenAIServerLLM({self.base_url!r}, model={self.model!r})"

    # -- the LLM interface -------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig()
                 ) -> list[str]:
        """The continuation of each prompt, cut before the first stop string."""
        prompts = _texts(prompts, "prompts")

        def request(start: int, chunk: list[str]) -> list[str]:
            body = {"prompt": chunk if len(chunk) > 1 else chunk[0],
                    "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "seed": sampling.seed + start}
            if sampling.stop:
                body["stop"] = list(sampling.stop)
            choices = self._choices(self._completions(body), len(chunk))
            texts = []
            for choice in choices:
                if not isinstance(choice.get("text"), str):
                    raise LLMRequestError(f"{self._url('/v1/completions')} answered a choice "
                                          f"without text: {_short(choice)}")
                texts.append(_cut_at_stop(choice["text"], sampling.stop))
            return texts

        return self._map_chunks(prompts, request)

    def log_likelihood(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        """float64 [N]: log p(continuation | prompt), from the server's log-probs of the prompt
        + continuation tokens that start at or after len(prompt) (see the module's caveat)."""
        prompts = _texts(prompts, "prompts")
        continuations = _texts(continuations, "continuations")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
        empty = [i for i, c in enumerate(continuations) if not c]
        if empty:
            raise ValueError(f"continuations {empty[:5]} are empty; a continuation needs text.")
        pairs = list(zip(prompts, continuations))

        def request(start: int, chunk: list[tuple[str, str]]) -> list[float]:
            texts = [p + c for p, c in chunk]
            max_tokens = self._score_max_tokens
            body = {"prompt": texts if len(texts) > 1 else texts[0], "max_tokens": max_tokens,
                    "echo": True, "logprobs": max_tokens, "temperature": 0.0}
            try:
                response = self._completions(body)
            except LLMRequestError as refusal:
                if max_tokens != 0 or refusal.status != 400:
                    raise
                # Some servers refuse max_tokens 0 (or logprobs 0): ask for one token, leave it
                # out, and keep asking so. If that fails too, the first refusal is the one shown.
                max_tokens = 1
                try:
                    response = self._completions({**body, "max_tokens": 1, "logprobs": 1})
                except LLMRequestError:
                    raise refusal from None
                self._score_max_tokens = 1
            usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
            choices = self._choices(response, len(chunk))
            return [self._continuation_log_prob(choice, prompt, continuation, usage, len(chunk),
                                                start + i, max_tokens)
                    for i, (choice, (prompt, continuation)) in enumerate(zip(choices, chunk))]

        return np.asarray(self._map_chunks(pairs, request), np.float64)

    # -- internals ---------------------------------------------------------------------------

    def _continuation_log_prob(self, choice: dict, prompt: str, continuation: str, usage: dict,
                               rows: int, index: int, max_tokens: int) -> float:
        url = self._url("/v1/completions")
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
            raise LLMRequestError(
                f"{url} answered no logprobs.token_logprobs for pair {index} (got "
                f"{_short(logprobs)}); log_likelihood needs a server that returns the prompt's "
                "log-probs for echo=true (vLLM, gemb llm serve; llama.cpp's llama-server "
                "returns generated tokens only).")
        token_logprobs = logprobs["token_logprobs"]
        offsets = logprobs.get("text_offset")
        tokens = logprobs.get("tokens")
        if not isinstance(offsets, list) or len(offsets) != len(token_logprobs):
            raise LLMRequestError(f"{url} answered no text_offset matching token_logprobs for "
                                  f"pair {index}; log_likelihood needs both.")
        # The echoed prompt's entries come first; the generated ones (max_tokens > 0) last.
        generated = max_tokens
        if rows == 1 and isinstance(usage.get("completion_tokens"), int):
            generated = usage["completion_tokens"]
        echoed = len(token_logprobs) - generated
        text = prompt + continuation
        shift = 0
        if (echoed > 0 and isinstance(tokens, list) and len(tokens) == len(offsets)
                and isinstance(tokens[echoed - 1], str)):
            # Offsets that end past the text (a BOS counted as "<bos>") are moved back.
            shift = max(0, offsets[echoed - 1] + len(tokens[echoed - 1]) - len(text))
        # A continuation token starts in [len(prompt), len(text)); the generated token (when a
        # server needed max_tokens 1) starts at len(text).
        scored = [lp for lp, offset in zip(token_logprobs[:max(echoed, 0)], offsets)
                  if isinstance(offset, int) and len(prompt) <= offset - shift < len(text)]
        if not scored:
            raise LLMRequestError(
                f"{url} answered no log-probs for the continuation of pair {index} "
                f"({len(token_logprobs)} entries, none past character {len(prompt)}); the server "
                "must return the prompt's log-probs for echo=true (vLLM, gemb llm serve; "
                "llama.cpp's llama-server returns generated tokens only).")
        if any(not isinstance(lp, (int, float)) for lp in scored):
            raise LLMRequestError(
                f"{url} gave a null log-prob to a continuation token of pair {index} (the first "
                "token of a text has none on servers without BOS); give the pair a non-empty "
                "prompt.")
        return float(np.sum(np.asarray(scored, np.float64)))

    def _map_chunks(self, items: list, request: Callable[[int, list], list]) -> list:
        """request(start, items[start:start + k]) for every chunk, concurrently; results in
        order. The first failure cancels the requests not yet started and is raised."""
        if not items:
            return []
        self._resolve_model()
        size = self.prompts_per_request
        starts = range(0, len(items), size)
        if len(starts) == 1 or self.max_concurrency == 1:
            return [out for s in starts for out in request(s, items[s:s + size])]
        pool = concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(starts)),
                                                     thread_name_prefix="gemb-llm-http")
        try:
            futures = [pool.submit(request, s, items[s:s + size]) for s in starts]
            results = []
            for future in futures:
                results.extend(future.result())
            return results
        finally:
            # On failure the running requests finish (or fail) in the background; the caller
            # gets the error now.
            pool.shutdown(wait=False, cancel_futures=True)

    def _resolve_model(self):
        if self._model_resolved:
            return
        try:
            listing = self._request("GET", "/v1/models", None)
            data = listing.get("data") if isinstance(listing, dict) else None
            if data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
                self.model = data[0]["id"]
        except LLMRequestError:  # a server without /v1/models: requests go without a model
            pass
        self._model_resolved = True

    def _completions(self, body: dict) -> dict:
        if self.model is not None:
            body = {"model": self.model, **body}
        response = self._request("POST", "/v1/completions", body)
        if not isinstance(response, dict):
            raise LLMRequestError(f"{self._url('/v1/completions')} answered {_short(response)}, "
                                  "not a JSON object.")
        return response

    def _choices(self, response: dict, count: int) -> list[dict]:
        choices = response.get("choices")
        if not isinstance(choices, list) or len(choices) != count or not all(
                isinstance(c, dict) for c in choices):
            raise LLMRequestError(f"{self._url('/v1/completions')} answered "
                                  f"{_short(choices)} as choices for {count} prompt(s).")
        if all(isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        return choices

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _request(self, method: str, path: str, body: dict | None) -> Any:
        """One call, retried with backoff on connection errors, timeouts, 5xx and 429."""
        url = self._url(path)
        data = None if body is None else json.dumps(body).encode("utf-8")
        attempts = self.max_retries + 1
        error = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                return self._attempt(method, url, data)
            except _Retryable as retryable:
                error = retryable
        if error.status is not None:  # it answered, with 5xx / 429 every time
            fix = ("The server is up but failing or overloaded: see its log, or lower "
                   "max_concurrency.")
        else:
            fix = ("Start the server: gemb llm serve --model_dir MODEL_DIR --port PORT (or vLLM "
                   "/ llama-server), or check --llm.")
        raise LLMServerUnavailable(
            f"LLM server {self.base_url} unavailable: {method} {url} failed {attempts} times "
            f"(timeout {self.timeout_s:g} s, backoff from {self.backoff_s:g} s); last error: "
            f"{error.reason}. {fix}")

    def _attempt(self, method: str, url: str, data: bytes | None) -> Any:
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            message = _error_message(error)
            if error.code in _RETRIED_STATUSES:
                raise _Retryable(f"HTTP {error.code}: {message}", error.code) from None
            raise LLMRequestError(f"{method} {url} failed with HTTP {error.code}: {message}",
                                  status=error.code) from None
        except urllib.error.URLError as error:  # refused, unknown host, TLS, timeout in connect
            raise _Retryable(f"{type(error.reason).__name__}: {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:  # reset, timeout while reading
            raise _Retryable(f"{type(error).__name__}: {error}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise LLMRequestError(f"{method} {url} answered non-JSON: {raw[:200]!r}") from None


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's own message from an error response (OpenAI, vLLM and llama.cpp shapes)."""
    try:
        raw = error.read()
    except Exception:  # noqa: BLE001  the status line is all there is
        return error.reason or ""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:1000] or str(error.reason)
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        if body.get("message"):
            return str(body["message"])
        if body.get("detail"):
            return str(body["detail"])
    return _short(body)


def _texts(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of str, got one {type(values).__name__}; "
                        "wrap it in a list.")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be str, got {type(value).__name__}.")
    return values


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."
