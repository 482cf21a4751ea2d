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


@pytest.mark.parametrize("parallelism", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2_fsdp2_tensor2"])
def test_sharded_decoding_and_scoring_equal_one_device(tiny_decoder, parallelism):
    """Over a mesh as training shards (parameters by the logical-axis rules, rows over the data
    axes; 4 prompts padded to the data-parallel multiple): the same tokens and log-likelihoods."""
    from gemb.partitioning import mesh
    from gemb.partitioning.partitioner import Partitioner

    partitioner = Partitioner(mesh.create_mesh(parallelism))
    sharded = GemmaDecoder(CAUSAL_TINY, tiny_decoder.params, stop_ids=(), length_multiple=8,
                           partitioner=partitioner)
    leaves = jax.tree.leaves(sharded.params)
    assert all(len(leaf.sharding.device_set) == 8 for leaf in leaves)
    # fsdp / tensor > 1: the parameters are split, not copied.
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves) == (parallelism[1] > 1)
    prompts = _prompts()
    for sampling in (SamplingConfig(max_new_tokens=12),
                     SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)):
        assert sharded.generate_ids(prompts, sampling) == tiny_decoder.generate_ids(prompts,
                                                                                    sampling)
    continuations = [[5, 6, 7], [9], [3, 4], [11, 12, 13, 14]]
    np.testing.assert_allclose(sharded.log_likelihood_ids(prompts, continuations),
                               tiny_decoder.log_likelihood_ids(prompts, continuations),
                               rtol=1e-5, atol=1e-5)


def test_make_llm_shards_a_model_folder_over_the_local_devices(tmp_path_factory):
    from tiny_checkpoints import write_tiny_llm_folder

    from gemb.llm.interface import make_llm, parse_mesh

    folder = write_tiny_llm_folder(tmp_path_factory)
    default = make_llm(folder)  # 8 local devices here: all of them on the data axis
    assert dict(default.partitioner.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    split = make_llm(folder, mesh="2,2,2")  # restored straight into its shards
    assert dict(split.partitioner.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(split.params))
    with pytest.raises(ValueError, match="not DATA,FSDP,TENSOR"):
        parse_mesh("2,2")
    with pytest.raises(ValueError, match="not to the server"):
        make_llm("http://127.0.0.1:9", mesh="1,1,1")


def test_option_log_probs_equal_log_likelihood_of_each_pair(tmp_path_factory):
    """The judge's shortcut: one pass per prompt for options that differ only in their last
    token equals scoring each (prompt, option) pair; other options fall back to the pairs."""
    from tiny_checkpoints import write_tiny_llm_folder

    folder = write_tiny_llm_folder(tmp_path_factory, ["0", "1", "2", "3", "Rating"])
    decoder = GemmaDecoder.from_model_dir(folder, length_multiple=8, score_batch_size=3)
    prompts = ["w100 w101 Rating", "w7 Rating", "w9 w10 w11 w12 w13 w14 w15 Rating",
               "Rating", "w20 w21"]
    # One token each; a shared first token then one each (Gemma's grades); no shortcut.
    for options in ([" 0", " 1", " 2", " 3"], [" 0 1", " 0 3", " 0 2"], [" 0 1", " 3"]):
        pairs = decoder.log_likelihood([p for p in prompts for _ in options],
                                       [o for _ in prompts for o in options])
        np.testing.assert_allclose(decoder.option_log_probs(prompts, options),
                                   pairs.reshape(len(prompts), len(options)),
                                   rtol=1e-5, atol=1e-5)
