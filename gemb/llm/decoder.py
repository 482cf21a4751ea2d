"""Generation and scoring with gemb's own Gemma 3 as a language model (causal mode, KV cache).

The data-quality stages (synthetic queries, LLM filtering, hard-negative scoring) need an LLM;
this one is the same Transformer the encoder is built from, run causally with the tied
embedding as its LM head, so any converted Gemma 3 folder serves (the 270M on CPU, a large one
on accelerators) without another runtime.

Generation: prompts are LEFT-padded to one length (a multiple of `length_multiple`, so a few
shapes are compiled), the prefill writes the prompt into the KV cache (gemb.models.gemma3.
init_cache) and every step appends one column for all rows. Padding slots are masked as keys
and positions count each row's own tokens, so a row's result does not depend on the others.
The whole loop is one jitted lax.scan over the new tokens; rows that emitted an EOS id are cut
there on the host, and stop strings cut the decoded text.

Scoring: log p(continuation | prompt) summed over the continuation's tokens, from one causal
forward pass of prompt + continuation (right-padded rows, no sampling).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemb.models import gemma3
from gemb.models.config import TransformerConfig

# Gemma's <eos> and <end_of_turn>: either ends a generation.
GEMMA_STOP_IDS = (1, 106)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How new tokens are drawn.

    temperature: 0 = greedy (argmax); otherwise softmax(logits / temperature).
    top_p: nucleus sampling: draw from the smallest set of tokens whose probability adds up to
      at least top_p (1.0 = all tokens).
    stop: strings that end a generation (the text is cut before the first one).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")


def sample_next(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array
                ) -> jax.Array:
    """[B, V] float32 logits -> [B] token ids: argmax when temperature is 0, else a draw from
    the top-p nucleus of softmax(logits / temperature)."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token when the probability of the tokens before it is still below top_p (the
    # most likely token is always kept).
    before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    drawn = jax.random.categorical(rng, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, drawn[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


class GemmaDecoder:
    """Gemma 3 as an LLM: `generate` / `generate_ids` and `log_likelihood(_ids)`.

    Args:
      config: the transformer's config (its attention_mode is set to causal here).
      params: the transformer's params (an encoder's params["transformer"], or a converted
        model folder's, see `from_model_dir`).
      tokenizer: a gemb.tokenizer.Tokenizer for the text methods (ids methods need none).
      stop_ids: token ids that end a generation.
      length_multiple: prompt lengths are padded up to a multiple of this (fewer compiles).
      score_batch_size: rows per forward pass when scoring (the [rows, T, vocab] logits of a
        262k vocabulary are the memory to watch).
    """

    def __init__(self, config: TransformerConfig, params: Any, tokenizer=None, *,
                 stop_ids: Sequence[int] = GEMMA_STOP_IDS, pad_id: int = 0,
                 length_multiple: int = 16, score_batch_size: int = 8):
        self.config = config.replace(attention_mode="causal")
        self.model = gemma3.Transformer(self.config)
        self.params = params
        self.tokenizer = tokenizer
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = pad_id
        self.length_multiple = length_multiple
        self.score_batch_size = score_batch_size

    @classmethod
    def from_model_dir(cls, model_dir, **kwargs) -> "GemmaDecoder":
        """The decoder of a folder written by `gemb convert` (its transformer; the projection
        head is not used) with its tokenizer."""
        from gemb.checkpoints import model_dir as model_dir_lib
        from gemb.models import encoder as encoder_lib
        from gemb.tokenizer import Tokenizer
        from flax import linen as nn

        config, _ = model_dir_lib.read_model_config(model_dir)
        abstract = nn.unbox(encoder_lib.boxed_params(config))
        params = model_dir_lib.load_params(model_dir, abstract)
        return cls(config.transformer, params["transformer"], Tokenizer.from_dir(model_dir),
                   **kwargs)

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig()
                 ) -> list[str]:
        """The continuation of each prompt (BOS is prepended), cut at a stop id or string."""
        tokenizer = self._need_tokenizer()
        ids = self.generate_ids(tokenizer.encode_batch(list(prompts)), sampling)
        return [_cut_at_stop(tokenizer.decode(row), sampling.stop) for row in ids]

    def generate_ids(self, prompts: Sequence[Sequence[int]],
                     sampling: SamplingConfig = SamplingConfig()) -> list[list[int]]:
        """New token ids per prompt, without the stop id that ended it."""
        if not prompts:
            return []
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompts {empty[:5]} are empty; a prompt needs at least one token "
                             "(the text methods prepend BOS).")
        longest = max(len(p) for p in prompts)
        length = -(-longest // self.length_multiple) * self.length_multiple
        if length + sampling.max_new_tokens > self.config.max_length:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens="
                             f"{sampling.max_new_tokens} exceeds the model's max_length "
                             f"{self.config.max_length}; shorten the prompt or generate less.")
        rows = len(prompts)
        tokens = np.full((rows, length), self.pad_id, np.int32)
        segments = np.zeros((rows, length), np.int32)
        positions = np.zeros((rows, length), np.int32)
        for row, prompt in enumerate(prompts):
            start = length - len(prompt)
            tokens[row, start:] = prompt
            segments[row, start:] = 1
            positions[row, start:] = np.arange(len(prompt))
        new = np.asarray(self._generate(
            self.params, tokens, segments, positions, jax.random.key(sampling.seed),
            jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
            max_new_tokens=sampling.max_new_tokens))
        out = []
        for row in new.tolist():
            stops = [i for i, token in enumerate(row) if token in self.stop_ids]
            out.append(row[:stops[0]] if stops else row)
        return out

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens",))
    def _generate(self, params, tokens, segments, positions, rng, temperature, top_p, *,
                  max_new_tokens):
        rows, length = tokens.shape
        cache = gemma3.init_cache(self.config, rows, length + max_new_tokens)
        hidden, cache = self.model.apply({"params": params}, tokens, segments, positions,
                                         cache=cache)
        logits = self._logits(params, hidden[:, -1])
        first_rng, rng = jax.random.split(rng)
        first = sample_next(logits, first_rng, temperature, top_p)
        next_position = positions[:, -1] + 1

        def step(carry, step_rng):
            token, position, cache = carry
            hidden, cache = self.model.apply(
                {"params": params}, token[:, None], jnp.ones((rows, 1), jnp.int32),
                position[:, None], cache=cache)
            following = sample_next(self._logits(params, hidden[:, -1]), step_rng, temperature,
                                    top_p)
            return (following, position + 1, cache), following

        _, rest = jax.lax.scan(step, (first, next_position, cache),
                               jax.random.split(rng, max_new_tokens - 1))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    def _logits(self, params, hidden: jax.Array) -> jax.Array:
        """[B, D] hidden -> [B, V] float32 logits of the tied embedding."""
        return self.model.apply({"params": params}, hidden[:, None],
                                method=lambda m, h: m.embedder.decode(h))[:, 0].astype(
                                    jnp.float32)

    # -- scoring -----------------------------------------------------------------------------

    def log_likelihood(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        """log p(continuation | prompt) per pair; the prompt gets BOS, the continuation none."""
        tokenizer = self._need_tokenizer()
        return self.log_likelihood_ids(tokenizer.encode_batch(list(prompts)),
                                       tokenizer.encode_batch(list(continuations), add_bos=False))

    def log_likelihood_ids(self, prompts: Sequence[Sequence[int]],
                           continuations: Sequence[Sequence[int]]) -> np.ndarray:
        """float64 [N]: the sum over the continuation's tokens of log p(token | everything
        before it), by one causal forward pass per batch of rows."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
        bad = [i for i, (p, c) in enumerate(zip(prompts, continuations)) if not p or not c]
        if bad:
            raise ValueError(f"pairs {bad[:5]} have an empty prompt or continuation; both need "
                             "tokens.")
        totals = np.zeros(len(prompts), np.float64)
        for start in range(0, len(prompts), self.score_batch_size):
            chunk = range(start, min(start + self.score_batch_size, len(prompts)))
            rows = [list(prompts[i]) + list(continuations[i]) for i in chunk]
            tokens, segments = self.right_padded(rows)
            # Only the columns that predict a continuation token go through the LM head: with
            # a 262k vocabulary the head costs more than the transformer on long prompts with
            # short continuations (a grade, a query). Their count is rounded up to a power of
            # two (a few compiled shapes).
            width = 1 << (max(len(continuations[i]) for i in chunk) - 1).bit_length()
            columns = np.zeros((len(rows), width), np.int32)
            targets = np.zeros((len(rows), width), np.int32)
            valid = np.zeros((len(rows), width), bool)
            for row, i in enumerate(chunk):
                count, first = len(continuations[i]), len(prompts[i])
                columns[row, :count] = np.arange(first - 1, first - 1 + count)
                targets[row, :count] = continuations[i]
                valid[row, :count] = True
            totals[start:start + len(rows)] = np.asarray(self._sum_log_probs(
                self.params, tokens, segments, columns, targets, valid), np.float64)
        return totals

    def right_padded(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, segment ids) [len(rows), L] of token rows right-padded to L, the longest
        row rounded up to a multiple of length_multiple (a few compiled shapes)."""
        longest = max(len(r) for r in rows)
        if longest > self.config.max_length:
            raise ValueError(f"a text of {longest} tokens exceeds the model's max_length "
                             f"{self.config.max_length}.")
        length = -(-longest // self.length_multiple) * self.length_multiple
        tokens = np.full((len(rows), length), self.pad_id, np.int32)
        segments = np.zeros((len(rows), length), np.int32)
        for row, seq in enumerate(rows):
            tokens[row, :len(seq)] = seq
            segments[row, :len(seq)] = 1
        return tokens, segments

    @functools.partial(jax.jit, static_argnums=(0,))
    def _sum_log_probs(self, params, tokens, segments, columns, targets, valid):
        """sum over valid c of log p(targets[c] | tokens up to columns[c]), per row."""
        hidden = self.model.apply({"params": params}, tokens, segments)
        picked = jnp.take_along_axis(hidden, columns[..., None], axis=1)  # [B, C, D]
        logits = self.model.apply({"params": params}, picked,
                                  method=lambda m, h: m.embedder.decode(h)).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, chosen, 0.0), axis=-1)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this GemmaDecoder has no tokenizer; pass one (or use "
                             "GemmaDecoder.from_model_dir) for text, or call the *_ids methods.")
        return self.tokenizer

    def __hash__(self):  # jit's static self: one compiled program per decoder object
        return id(self)

    def __eq__(self, other):
        return self is other


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text
