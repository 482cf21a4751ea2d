"""gemb's Gemma 3 as an LLM: KV-cache decoding equals full re-computation (TINY), and greedy
generation and continuation log-likelihoods equal transformers' on the real 270M (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gemb.checkpoints import layout
from gemb.llm.decoder import GemmaDecoder, SamplingConfig, sample_next
from gemb.models import gemma3
from gemb.models.config import TINY

CAUSAL_TINY = TINY.replace(attention_mode="causal", sliding_window_size=6)


@pytest.fixture(scope="module")
def tiny_decoder():
    params = nn.unbox(gemma3.Transformer(CAUSAL_TINY).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return GemmaDecoder(CAUSAL_TINY, params, stop_ids=(), length_multiple=8)


def _prompts():
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, TINY.vocab_size, size)) for size in (5, 11, 1, 8)]


def _greedy_by_recomputation(decoder, prompt, steps):
    """Greedy continuation with a full forward pass over the whole sequence per new token (in
    one right-padded buffer, so it compiles once: causal attention keeps the padding after the
    sequence out of every earlier position)."""
    buffer = np.zeros((1, 32), np.int32)

    @jax.jit
    def next_token(tokens, segments, last):
        _, logits = decoder.model.apply({"params": decoder.params}, tokens, segments,
                                        return_logits=True)
        return jnp.argmax(logits[0, last])

    sequence = list(prompt)
    for _ in range(steps):
        buffer[0, :len(sequence)] = sequence
        segments = (np.arange(32) < len(sequence)).astype(np.int32)[None]
        sequence.append(int(next_token(buffer, segments, len(sequence) - 1)))
    return sequence[len(prompt):]


def test_kv_cache_decoding_equals_full_recomputation(tiny_decoder):
    """Batched, left-padded prompts of different lengths, decoded past the sliding window (6)
    of the local layers: every row equals its own greedy decoding by full re-computation."""
    steps = 12
    got = tiny_decoder.generate_ids(_prompts(), SamplingConfig(max_new_tokens=steps))
    for prompt, row in zip(_prompts(), got):
        assert row == _greedy_by_recomputation(tiny_decoder, prompt, steps)


def test_log_likelihood_equals_the_sum_of_next_token_log_probs(tiny_decoder):
    prompts = _prompts()
    continuations = [[7, 8, 9], [10], [11, 12], [13, 14, 15, 16]]
    got = tiny_decoder.log_likelihood_ids(prompts, continuations)
    for total, prompt, continuation in zip(got, prompts, continuations):
        sequence = prompt + continuation
        _, logits = tiny_decoder.model.apply({"params": tiny_decoder.params},
                                             jnp.asarray([sequence]), return_logits=True)
        log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)), np.float64)
        want = sum(log_probs[t - 1, sequence[t]] for t in range(len(prompt), len(sequence)))
        np.testing.assert_allclose(total, want, rtol=1e-5)


def test_sampling_draws_from_the_nucleus_and_greedy_is_argmax():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(1)
    greedy = sample_next(logits, keys, jnp.float32(0.0), jnp.float32(1.0))
    assert set(np.asarray(greedy).tolist()) == {0}
    # top_p 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), redrawn in proportion 5:3.
    drawn = np.asarray(sample_next(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))
    assert set(drawn.tolist()) == {0, 1}
    assert abs(np.mean(drawn == 0) - 0.5 / 0.8) < 0.03
    everything = np.asarray(sample_next(logits, keys, jnp.float32(1.0), jnp.float32(1.0)))
    assert set(everything.tolist()) == {0, 1, 2, 3}


def test_bad_requests_name_the_fix(tiny_decoder):
    with pytest.raises(ValueError, match="empty"):
        tiny_decoder.generate_ids([[5], []])
    with pytest.raises(ValueError, match="max_length"):
        tiny_decoder.generate_ids([[5] * 500], SamplingConfig(max_new_tokens=100))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny_decoder.generate(["hello"])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


GENERATION_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Москва — столица",
]


@pytest.mark.slow
def test_greedy_generation_and_log_likelihoods_equal_transformers(
        gemma3_270m_upstream, hf_gemma3_270m_causal_lm, hf_gemma3_270m_tokenizer):
    torch = pytest.importorskip("torch")
    config, upstream = gemma3_270m_upstream
    decoder = GemmaDecoder(config, layout.to_model_layout(upstream, config))
    prompts = [hf_gemma3_270m_tokenizer(p).input_ids for p in GENERATION_PROMPTS]
    ours = decoder.generate_ids(prompts, SamplingConfig(max_new_tokens=32))
    continuations = []
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            reference = hf_gemma3_270m_causal_lm.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=32, do_sample=False, eos_token_id=list(decoder.stop_ids),
                pad_token_id=0)[0, len(prompt):].tolist()
        reference = [t for t in reference if t != 0]
        stops = [i for i, t in enumerate(reference) if t in decoder.stop_ids]
        reference = reference[:stops[0]] if stops else reference
        assert got == reference, (hf_gemma3_270m_tokenizer.decode(got),
                                  hf_gemma3_270m_tokenizer.decode(reference))
        continuations.append(got or [1])
    # The comparison is over real generations, not rows that stopped at once.
    assert sum(len(c) for c in ours) >= 4 * 32, [len(c) for c in ours]

    ours_ll = decoder.log_likelihood_ids(prompts, continuations)
    for total, prompt, continuation in zip(ours_ll, prompts, continuations):
        with torch.no_grad():
            logits = hf_gemma3_270m_causal_lm(torch.tensor([prompt + continuation])).logits[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1).numpy()
        want = sum(log_probs[t - 1, (prompt + continuation)[t]]
                   for t in range(len(prompt), len(prompt) + len(continuation)))
        np.testing.assert_allclose(total, want, rtol=1e-4)
