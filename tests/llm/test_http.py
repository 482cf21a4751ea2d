"""The HTTP backend against a REAL `gemb llm serve` process on 127.0.0.1 over a TINY model
folder: generation and log-likelihoods through HTTP equal GemmaDecoder in-process, results
come back in order under concurrency, a server killed mid-run raises LLMServerUnavailable
within the retry budget, a bad request surfaces the server's message at once, and a missing
model folder fails at startup."""

import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from tiny_checkpoints import WORDS, write_tiny_llm_folder

from gemb.llm.decoder import GemmaDecoder, SamplingConfig
from gemb.llm.http import LLMRequestError, LLMServerUnavailable, OpenAIServerLLM
from gemb.llm.interface import LLM, make_llm

PROMPTS = ["what is the capital of france", "python function returns a list",
           "search query", "the title of the text is"]
STARTUP_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A TINY folder whose word-level tokenizer covers the whole 512-id vocabulary (so any
    generated id decodes): tiny_checkpoints' words, then fillers "w<id>"."""
    folder = write_tiny_llm_folder(tmp_path_factory)
    assert not (folder / "tokenizer.model").exists()
    return folder


@pytest.fixture(scope="module")
def decoder(model_folder):
    return GemmaDecoder.from_model_dir(model_folder)


class Server:
    def __init__(self, process, url, log_path):
        self.process, self.url, self.log_path = process, url, log_path

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def start_server(model_folder, log_path) -> Server:
    """`gemb llm serve --port 0` in a subprocess; waits for its "serving URL" line."""
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gemb.cli", "llm", "serve", "--model_dir", str(model_folder),
         "--port", "0"], stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    lines = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(STARTUP_TIMEOUT_S)
    line = lines[0].strip() if lines else ""
    if not line.startswith("serving http://"):
        process.kill()
        process.wait()
        raise AssertionError(f"the server did not start (first line {line!r}); its log:\n"
                             f"{open(log_path).read()[-3000:]}")
    return Server(process, line.split()[1], log_path)


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    running = start_server(model_folder, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def greedy(decoder):
    sampling = SamplingConfig(max_new_tokens=8)
    return sampling, decoder.generate(PROMPTS, sampling)


def _post(url, body):
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_make_llm_picks_the_backend(server, model_folder):
    llm = make_llm(server.url + "/v1/", max_concurrency=2)
    assert isinstance(llm, OpenAIServerLLM) and isinstance(llm, LLM)
    assert llm.base_url == server.url
    assert make_llm(llm) is llm
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    llm.generate(["what"], SamplingConfig(max_new_tokens=1))  # resolves the model name
    assert llm.model == model_folder.name


def test_greedy_generation_over_http_equals_in_process(server, decoder, greedy):
    sampling, want = greedy
    assert all(want), want  # the random TINY model does produce words
    llm = OpenAIServerLLM(server.url, max_concurrency=4)
    assert llm.generate(PROMPTS, sampling) == want
    # A stop string cuts both at the same place.
    stop = want[0].split()[2]
    stopped = SamplingConfig(max_new_tokens=8, stop=(stop,))
    assert llm.generate(PROMPTS, stopped) == decoder.generate(PROMPTS, stopped)
    assert llm.generate(PROMPTS[:1], stopped)[0] == want[0][:want[0].index(stop)]


def test_log_likelihood_over_http_equals_in_process(server, decoder):
    prompts = ["what is the", "python function", "the capital of", ""]
    continuations = [" capital of france", " returns a list", " france is paris", "paris is"]
    want = decoder.log_likelihood(prompts, continuations)
    got = OpenAIServerLLM(server.url).log_likelihood(prompts, continuations)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The echoed prompt's entries: BOS is not listed, offsets count the decoded prefix.
    logprobs = _post(server.url, {"prompt": "what is the", "max_tokens": 0, "echo": True,
                                  "logprobs": 1})["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["what", " is", " the"]
    assert logprobs["text_offset"] == [0, 4, 7]
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"])
    assert [len(top) for top in logprobs["top_logprobs"]] == [1, 1, 1]


def test_many_concurrent_requests_come_back_in_order(server, decoder, greedy):
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, 4)) for _ in range(24)]
    continuations = [" " + " ".join(rng.choice(WORDS, 3)) for _ in range(24)]
    want = decoder.log_likelihood(prompts, continuations)
    assert len(set(np.round(want, 4))) == 24  # distinct: a swap would show
    got = OpenAIServerLLM(server.url, max_concurrency=8).log_likelihood(prompts, continuations)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # List prompts (3 per request), 4 requests in flight.
    sampling, texts = greedy
    llm = OpenAIServerLLM(server.url, max_concurrency=4, prompts_per_request=3)
    assert llm.generate(PROMPTS * 3, sampling) == texts * 3


def test_a_bad_request_fails_at_once_with_the_servers_message(server):
    llm = OpenAIServerLLM(server.url, max_retries=3, backoff_s=2.0)
    start = time.monotonic()
    with pytest.raises(LLMRequestError, match="max_length 512") as info:
        llm.generate([" ".join(["the"] * 600)], SamplingConfig(max_new_tokens=4))
    assert time.monotonic() - start < 1.5  # no retries
    assert info.value.status == 400 and "HTTP 400" in str(info.value)


def kill_after_answers(llm, server, count):
    """Kills `server` right after `llm` received its count-th answer: from inside the client's
    own request path, so the requests after it meet a dead server."""
    answered, attempt = [], llm._attempt

    def attempt_then_maybe_kill(*args):
        result = attempt(*args)
        answered.append(1)
        if len(answered) == count:
            server.process.kill()
            server.process.wait()
        return result

    llm._attempt = attempt_then_maybe_kill


def test_a_server_killed_mid_run_raises_a_clear_error(model_folder, tmp_path):
    running = start_server(model_folder, tmp_path / "server.log")
    try:
        llm = OpenAIServerLLM(running.url, max_concurrency=2, timeout_s=5, max_retries=2,
                              backoff_s=0.05)
        # The server dies after the third answer, while the other requests are in flight or
        # waiting.
        kill_after_answers(llm, running, 3)
        start = time.monotonic()
        with pytest.raises(LLMServerUnavailable) as info:
            llm.log_likelihood(["what is"] * 40, [" the capital"] * 40)
        assert time.monotonic() - start < 30
        assert isinstance(info.value, ConnectionError)
        message = str(info.value)
        assert running.url in message and "failed 3 times" in message
        assert "gemb llm serve --model_dir" in message and "--llm" in message
        # And so does a fresh call to the dead server, within the retry budget.
        start = time.monotonic()
        with pytest.raises(LLMServerUnavailable):
            llm.generate(["what"], SamplingConfig(max_new_tokens=2))
        assert time.monotonic() - start < 5
    finally:
        running.stop()


def test_a_stage_whose_server_died_resumes_on_a_live_one_without_repeating(
        tmp_path_factory, tmp_path):
    """filter-pairs through a real server killed mid-run: a clear error, the finished pairs
    kept; the rerun (on a new server) scores only the rest and ends with the files of an
    uninterrupted run."""
    import tokenizers

    from gemb.data import hard_negatives, llm_filter

    # The judge's prompt words in the vocabulary, so the server's offsets find the grade.
    prompt_words = [piece for piece, _ in tokenizers.pre_tokenizers.Whitespace().pre_tokenize_str(
        hard_negatives.RELEVANCE_PROMPT + " 0 1 2 3")]
    model_folder = write_tiny_llm_folder(tmp_path_factory, prompt_words)
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(
        {"id": f"p{i}", "query": " ".join(WORDS[i:i + 2]), "positive": " ".join(WORDS[i:i + 6])})
        + "\n" for i in range(10)))
    config = llm_filter.FilterConfig(batch_size=2)

    dying = start_server(model_folder, tmp_path / "dying.log")
    try:
        llm_filter.filter_pairs(str(source), OpenAIServerLLM(dying.url, max_concurrency=1,
                                                                prompts_per_request=8),
                                str(tmp_path / "reference"), config)
        # One request per batch of 2 pairs x 4 grades, as the reference run sent them.
        llm = OpenAIServerLLM(dying.url, max_concurrency=1, timeout_s=5, max_retries=1,
                              backoff_s=0.05, prompts_per_request=8)
        kill_after_answers(llm, dying, 4)  # GET /v1/models, then three batches of two pairs
        with pytest.raises(LLMServerUnavailable, match="gemb llm serve --model_dir"):
            llm_filter.filter_pairs(str(source), llm, str(tmp_path / "run"), config)
    finally:
        dying.stop()
    finished = sum(len((tmp_path / "run" / name).read_text().splitlines())
                   for name in ("kept.jsonl", "dropped.jsonl"))
    assert finished == 6

    live = start_server(model_folder, tmp_path / "live.log")
    try:
        summary = llm_filter.filter_pairs(str(source), OpenAIServerLLM(live.url, max_concurrency=1,
                                                                    prompts_per_request=8),
                                          str(tmp_path / "run"), config)
    finally:
        live.stop()
    assert summary["already_done"] == 6 and summary["scored"] == 4
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "reference" / name).read_text()


def test_serve_on_a_missing_folder_exits_with_a_clear_message(tmp_path):
    missing = tmp_path / "no_such_model"
    result = subprocess.run(
        [sys.executable, "-m", "gemb.cli", "llm", "serve", "--model_dir", str(missing),
         "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gemb llm serve: error" in result.stderr and str(missing) in result.stderr
    assert "not a gemb model folder" in result.stderr
    assert "serving" not in result.stdout


def test_echo_responses_of_other_servers_are_read_right():
    """The parsing alone, on the shapes other servers answer: vLLM lists Gemma's BOS as a
    token ("<bos>", null log-prob) that shifts every offset, and with max_tokens 1 appends the
    generated token; llama.cpp's llama-server returns only the generated token's log-prob."""
    llm = OpenAIServerLLM("http://127.0.0.1:9")
    prompt, continuation = "The step of", " boiling water"
    vllm = {"index": 0, "text": "The step of boiling water 1", "logprobs": {
        "tokens": ["<bos>", "The", " step", " of", " boiling", " water", " 1"],
        "token_logprobs": [None, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
        "text_offset": [0, 5, 8, 13, 16, 24, 30]}}
    usage = {"prompt_tokens": 6, "completion_tokens": 1}
    assert llm._continuation_log_prob(vllm, prompt, continuation, usage, 1, 0, 1) == -9.0
    llama_server = {"index": 0, "text": " 1", "logprobs": {
        "tokens": [" 1"], "token_logprobs": [-6.0], "text_offset": [25]}}
    with pytest.raises(LLMRequestError, match="llama-server returns generated tokens only"):
        llm._continuation_log_prob(llama_server, prompt, continuation, usage, 1, 0, 1)
    with pytest.raises(LLMRequestError, match="no logprobs.token_logprobs"):
        llm._continuation_log_prob({"text": "x", "logprobs": None}, prompt, continuation,
                                   usage, 1, 0, 1)
