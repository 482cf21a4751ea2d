"""`gemb llm serve --model_dir DIR [--host 127.0.0.1] [--port 8000]`: a small OpenAI-compatible
completions server over GemmaDecoder, so the data stages (and anything that speaks the API)
can share one loaded model through `OpenAIServerLLM`.

Endpoints:
  GET  /health          {"status": "ok", "model": NAME}
  GET  /v1/models       the one model
  POST /v1/completions  {prompt: str | [str], max_tokens=16, temperature=1.0, top_p=1.0,
                         stop=None, seed=0, echo=false, logprobs=None (0..20), n=1}

Prompts are tokenised as GemmaDecoder.generate does (BOS prepended), so a greedy completion
equals GemmaDecoder.generate's text. A list prompt is one batch. Model calls are serialised
with a lock (the HTTP threads only parse and write JSON); concurrency comes from list prompts.

logprobs: `tokens`, `token_logprobs`, `text_offset` (and `top_logprobs` when logprobs > 0) for
the echoed prompt's tokens (echo=true) and the generated ones, from one causal forward pass
over the whole sequence (`token_log_probs`). BOS is not listed: the first listed token is the
first token of the text and has a log-prob (log p(token | BOS)), unlike OpenAI's null for a
first token with no context. Offsets index the returned `text`; within the prompt they are the
lengths of the decoded token prefixes, which are the prompt's character positions when the
prompt survives a round trip through the tokenizer. max_tokens 0 generates nothing (with echo:
scoring only).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
MAX_TOP_LOGPROBS = 20


class BadRequest(ValueError):
    """A request the client must change (answered 400 with this message)."""


class CompletionEngine:
    """The model side of the server: OpenAI completion requests -> responses, one at a time."""

    def __init__(self, decoder, name: str):
        import jax

        if decoder.tokenizer is None:
            raise ValueError("the decoder has no tokenizer; the server needs text.")
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer
        self.name = name
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._log_probs = jax.jit(functools.partial(_forward_log_probs, decoder.model),
                                  static_argnames=("top_k",))

    # -- scoring -----------------------------------------------------------------------------

    def token_log_probs(self, sequences: Sequence[Sequence[int]], top_k: int = 0
                        ) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """Per sequence: float32 [len - 1] log p(token t | tokens < t) for t = 1.., and with
        top_k the [len - 1, top_k] best log-probs and their ids at each of those positions.
        One causal forward pass per batch of rows (right-padded, as GemmaDecoder scores)."""
        decoder = self.decoder
        out = []
        for start in range(0, len(sequences), decoder.score_batch_size):
            chunk = [list(s) for s in sequences[start:start + decoder.score_batch_size]]
            # A sharded decoder splits rows over its data axes: pad to a multiple (dropped).
            rows = chunk + [chunk[0]] * (decoder.rows_multiple(len(chunk)) - len(chunk))
            try:
                tokens, segments = decoder.place_rows(*decoder.right_padded(rows))
            except ValueError as error:
                raise BadRequest(str(error)) from None
            chosen, top_values, top_ids = (
                None if x is None else np.asarray(x)
                for x in self._log_probs(decoder.params, tokens, segments, top_k=top_k))
            for row, seq in enumerate(chunk):
                n = len(seq) - 1
                out.append((chosen[row, :n],
                            None if top_values is None else top_values[row, :n],
                            None if top_ids is None else top_ids[row, :n]))
        return out

    # -- completions -------------------------------------------------------------------------

    def complete(self, body: Any) -> dict:
        from gemb.llm.decoder import SamplingConfig, _cut_at_stop

        request = _parse_completion_request(body)
        prompts = request["prompts"]
        try:
            prompt_ids = self.tokenizer.encode_batch(prompts)
        except (TypeError, ValueError) as error:
            raise BadRequest(str(error)) from None
        max_tokens = request["max_tokens"]
        with self._lock:
            if max_tokens > 0:
                try:
                    sampling = SamplingConfig(
                        max_new_tokens=max_tokens, temperature=request["temperature"],
                        top_p=request["top_p"], seed=request["seed"])
                    new_ids = self.decoder.generate_ids(prompt_ids, sampling)
                except ValueError as error:
                    raise BadRequest(str(error)) from None
            else:
                new_ids = [[] for _ in prompts]
            choices = []
            kept_ids = []
            for prompt, ids in zip(prompts, new_ids):
                full = self.tokenizer.decode(ids)
                text = _cut_at_stop(full, request["stop"])
                stopped = len(text) < len(full) or len(ids) < max_tokens
                if len(text) < len(full):  # drop the tokens past the stop string
                    ids = ids[:_tokens_within(self.tokenizer, ids, len(text))]
                kept_ids.append(ids)
                choices.append({"index": len(choices),
                                "text": prompt + text if request["echo"] else text,
                                "logprobs": None,
                                "finish_reason": "stop" if stopped else "length"})
            if request["logprobs"] is not None:
                scores = self.token_log_probs(
                    [p + k for p, k in zip(prompt_ids, kept_ids)], top_k=request["logprobs"])
                for choice, prompt, ids, new, score in zip(choices, prompts, prompt_ids,
                                                           kept_ids, scores):
                    choice["logprobs"] = self._logprobs_entry(prompt, ids, new, score,
                                                              request["echo"])
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        completion_tokens = sum(len(ids) for ids in kept_ids)
        return {"id": f"cmpl-{time.time_ns():x}", "object": "text_completion",
                "created": int(time.time()), "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _logprobs_entry(self, prompt: str, prompt_ids: list[int], new_ids: list[int],
                        score, echo: bool) -> dict:
        """OpenAI's logprobs object for (prompt tokens if echo) + generated tokens. score[t - 1]
        is the log-prob of sequence token t (t >= 1: BOS at 0 is not listed)."""
        chosen, top_values, top_ids = score
        listed = []  # (position in the sequence, token string, offset into the returned text)
        if echo:
            strings, offsets = _token_strings(self.tokenizer, prompt_ids[1:])
            listed += [(1 + i, s, o) for i, (s, o) in enumerate(zip(strings, offsets))]
        strings, offsets = _token_strings(self.tokenizer, new_ids)
        base = len(prompt) if echo else 0
        listed += [(len(prompt_ids) + i, s, base + o)
                   for i, (s, o) in enumerate(zip(strings, offsets))]
        entry = {"tokens": [s for _, s, _ in listed],
                 "token_logprobs": [float(chosen[p - 1]) for p, _, _ in listed],
                 "text_offset": [o for _, _, o in listed],
                 "top_logprobs": None}
        if top_values is not None:
            entry["top_logprobs"] = [
                {self.tokenizer.decode([int(t)]): float(v)
                 for t, v in zip(top_ids[p - 1], top_values[p - 1])} for p, _, _ in listed]
        return entry


def _forward_log_probs(model, params, tokens, segments, *, top_k: int):
    import jax
    import jax.numpy as jnp

    _, logits = model.apply({"params": params}, tokens, segments, return_logits=True)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    if not top_k:
        return chosen, None, None
    values, ids = jax.lax.top_k(log_probs, top_k)
    return chosen, values, ids


def _token_strings(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[int]]:
    """Each token's text and its offset: the decoded prefixes' lengths (what the token adds to
    the decoded text, so that a token's leading space belongs to it)."""
    strings, offsets = [], []
    previous = ""
    for i in range(len(ids)):
        current = tokenizer.decode(ids[:i + 1])
        offsets.append(len(previous))
        strings.append(current[len(previous):] if current.startswith(previous)
                       else tokenizer.decode([ids[i]]))
        previous = current
    return strings, offsets


def _tokens_within(tokenizer, ids: Sequence[int], length: int) -> int:
    """How many leading tokens of ids start within the first `length` characters of their text."""
    _, offsets = _token_strings(tokenizer, ids)
    return sum(1 for offset in offsets if offset < length)


def _parse_completion_request(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object.")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise BadRequest("'prompt' must be a string or a non-empty list of strings (token-id "
                         "prompts are not supported).")
    if body.get("stream"):
        raise BadRequest("'stream' is not supported; send stream=false.")
    if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
        raise BadRequest("only n=1 (and best_of=1) is supported; send the prompt again for "
                         "more samples (with another seed).")

    def number(name, default, kind=float):
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and int(value) != value):
            raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}.")
        return kind(value)

    max_tokens = number("max_tokens", 16, int)
    if max_tokens < 0:
        raise BadRequest(f"'max_tokens' must be >= 0, got {max_tokens}.")
    temperature = number("temperature", 1.0)
    top_p = number("top_p", 1.0)
    if temperature < 0:
        raise BadRequest(f"'temperature' must be >= 0 (0 = greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}.")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings.")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool):  # the chat API's boolean form
            logprobs = 0 if logprobs else None
        else:
            logprobs = number("logprobs", None, int)
            if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise BadRequest(f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}.")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest(f"'echo' must be true or false, got {echo!r}.")
    return {"prompts": prompts, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stop": stop, "seed": number("seed", 0, int), "echo": echo,
            "logprobs": logprobs}


# -- HTTP --------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gemb-llm"

    @property
    def engine(self) -> CompletionEngine:
        return self.server.engine

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok", "model": self.engine.name})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.engine.name, "object": "model", "created": self.engine.created,
                 "owned_by": "gemb", "max_model_len": self.engine.decoder.config.max_length}]})
        else:
            self._error(404, f"no such endpoint: GET {path}", "not_found_error")

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(400, f"a body of Content-Length {length} is not accepted "
                                    f"(at most {MAX_BODY_BYTES} bytes).")
        raw = self.rfile.read(length)
        if path != "/v1/completions":
            return self._error(404, f"no such endpoint: POST {path} (this server has "
                                    "/v1/completions)", "not_found_error")
        try:
            body = json.loads(raw)
        except ValueError as error:
            return self._error(400, f"the body is not JSON ({error}).")
        try:
            response = self.engine.complete(body)
        except BadRequest as error:
            return self._error(400, str(error))
        except Exception as error:  # noqa: BLE001  the server stays up; the client sees why
            log.error("POST %s failed:\n%s", path, traceback.format_exc())
            return self._error(500, f"{type(error).__name__}: {error}", "server_error")
        self._send(200, response)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error"):
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002  requests at debug, not on stderr
        log.debug("%s %s", self.address_string(), format % args)


def make_server(engine: CompletionEngine, host: str = "127.0.0.1", port: int = 0
                ) -> ThreadingHTTPServer:
    """A server bound to (host, port) (0: a free port; see server.server_address); call
    serve_forever() on it."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.engine = engine
    return server


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print("usage: gemb llm serve --model_dir DIR [--host 127.0.0.1] [--port 8000]\n"
              "  an OpenAI-compatible completions server over a gemb model folder",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    parser = argparse.ArgumentParser(
        prog="gemb llm serve",
        description="Serve a gemb model folder as an OpenAI-compatible completions API "
                    "(GET /health, GET /v1/models, POST /v1/completions).")
    parser.add_argument("--model_dir", "--model", dest="model_dir", required=True,
                        help="a model folder written by `gemb convert` (local or gs://)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0: every interface; the API has no auth)")
    parser.add_argument("--port", type=int, default=8000, help="0 binds a free port")
    parser.add_argument("--name", default=None,
                        help="the model name in /v1/models and responses (default: the "
                             "folder's name)")
    parser.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                        help="how the decoder is sharded over this machine's devices (default: "
                             "all of them on the data axis; e.g. 1,1,8 for a model that needs 8)")
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start = time.time()
    from gemb.llm.interface import make_llm

    try:
        decoder = make_llm(args.model_dir, mesh=args.mesh)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as error:
        print(f"gemb llm serve: error: cannot load --model_dir {args.model_dir}: {error}",
              file=sys.stderr)
        return 2
    name = args.name or os.path.basename(str(args.model_dir).rstrip("/")) or "gemb"
    try:
        server = make_server(CompletionEngine(decoder, name), args.host, args.port)
    except OSError as error:
        print(f"gemb llm serve: error: cannot listen on {args.host}:{args.port} ({error}); "
              "choose another --port (0: any free one).", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    log.info("loaded %s (%s) in %.1f s", args.model_dir, decoder.config.name, time.time() - start)
    print(f"serving http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
