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

import contextlib
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

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
      partitioner: a gemb Partitioner to run sharded, as training does: the parameters placed
        by the training's logical-axis rules (fsdp / tensor), the rows of every batch split over
        the data axes (padded to a multiple of them), the results replicated. Its mesh may span
        one host's devices (`local_partitioner`: each process of a data job scores its own
        share) or every process of a job (then every process must make the same calls).
    """

    def __init__(self, config: TransformerConfig, params: Any, tokenizer=None, *,
                 stop_ids: Sequence[int] = GEMMA_STOP_IDS, pad_id: int = 0,
                 length_multiple: int = 16, score_batch_size: int = 8, partitioner=None):
        self.config = config.replace(attention_mode="causal")
        self.model = gemma3.Transformer(self.config)
        self.tokenizer = tokenizer
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = pad_id
        self.length_multiple = length_multiple
        self.score_batch_size = score_batch_size
        self.partitioner = partitioner
        replicated = None
        if partitioner is not None:
            boxed = jax.eval_shape(lambda: self.model.init(
                jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
            params = _place(params, partitioner.param_shardings(boxed))
            replicated = NamedSharding(partitioner.mesh, PartitionSpec())
        else:
            # On the device once: host (numpy) params would be copied in on every call.
            params = jax.device_put(params)
        self.params = params
        self._generate_jit = jax.jit(self._generate, static_argnames=("max_new_tokens",),
                                     out_shardings=replicated)
        self._score_jit = jax.jit(self._sum_log_probs, out_shardings=replicated)
        self._options_jit = jax.jit(self._option_log_probs, out_shardings=replicated)

    @classmethod
    def from_model_dir(cls, model_dir, **kwargs) -> "GemmaDecoder":
        """The decoder of a folder written by `gemb convert` (its transformer; the projection
        head is not used) with its tokenizer."""
        from gemb.checkpoints import model_dir as model_dir_lib
        from gemb.models import encoder as encoder_lib
        from gemb.tokenizer import Tokenizer
        from flax import linen as nn

        config, _ = model_dir_lib.read_model_config(model_dir)
        boxed = encoder_lib.boxed_params(config)
        partitioner = kwargs.get("partitioner")
        # With a partitioner the parameters are restored straight into their shards.
        abstract = (partitioner.abstract_params(boxed) if partitioner is not None
                    else nn.unbox(boxed))
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
        # Rows past the prompts (a data-parallel multiple) repeat the first prompt, and go.
        padded = [*prompts, *[prompts[0]] * (self.rows_multiple(rows) - rows)]
        tokens = np.full((len(padded), length), self.pad_id, np.int32)
        segments = np.zeros((len(padded), length), np.int32)
        positions = np.zeros((len(padded), length), np.int32)
        for row, prompt in enumerate(padded):
            start = length - len(prompt)
            tokens[row, start:] = prompt
            segments[row, start:] = 1
            positions[row, start:] = np.arange(len(prompt))
        new = np.asarray(self._generate_jit(
            self.params, *self.place_rows(tokens, segments, positions),
            np.uint32(sampling.seed), np.float32(sampling.temperature),
            np.float32(sampling.top_p), max_new_tokens=sampling.max_new_tokens))[:rows]
        out = []
        for row in new.tolist():
            stops = [i for i, token in enumerate(row) if token in self.stop_ids]
            out.append(row[:stops[0]] if stops else row)
        return out

    def rows_multiple(self, rows: int) -> int:
        """`rows` rounded up to a multiple of the data-parallel devices."""
        if self.partitioner is None:
            return rows
        return -(-rows // self.partitioner.data_parallel_size) * self.partitioner.data_parallel_size

    def place_rows(self, *arrays: np.ndarray) -> tuple:
        """Host [rows, ...] arrays split over the data axes (every process passes them whole)."""
        if self.partitioner is None:
            return arrays
        return tuple(_place(a, self.partitioner.batch_sharding(a.ndim)) for a in arrays)

    def _sharded(self):
        """Inside a jitted body: activation constraints resolve on the partitioner."""
        if self.partitioner is None:
            return contextlib.nullcontext()
        return self.partitioner.activation_context()

    def _generate(self, params, tokens, segments, positions, seed, temperature, top_p, *,
                  max_new_tokens):
        with self._sharded():
            return self._generate_body(params, tokens, segments, positions,
                                       jax.random.key(seed), temperature, top_p,
                                       max_new_tokens)

    def _generate_body(self, params, tokens, segments, positions, rng, temperature, top_p,
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
            # Rows past the chunk (a data-parallel multiple) repeat its first row, and go.
            rows += [rows[0]] * (self.rows_multiple(len(rows)) - len(rows))
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
            sums = self._score_jit(self.params, *self.place_rows(tokens, segments, columns,
                                                                  targets, valid))
            totals[start:start + len(chunk)] = np.asarray(sums, np.float64)[:len(chunk)]
        return totals

    def option_log_probs(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """float64 [N, K]: log p(option k | prompt n) for every prompt and option, equal to
        log_likelihood of each (prompt, option) pair. When the options differ only in their
        last token (Gemma's grades " 0" .. " 3" are "▁" + a digit), one forward pass of each
        prompt + the shared tokens serves all K options (the judge's case: about K times fewer
        tokens); otherwise it is log_likelihood over the N x K pairs."""
        tokenizer = self._need_tokenizer()
        option_ids = tokenizer.encode_batch(list(options), add_bos=False)
        shared = option_ids[0][:-1] if option_ids[0] else None
        if shared is None or any(ids[:-1] != shared or not ids for ids in option_ids):
            pairs = self.log_likelihood([p for p in prompts for _ in options],
                                        [o for _ in prompts for o in options])
            return pairs.reshape(len(prompts), len(options))
        prompt_ids = tokenizer.encode_batch(list(prompts))
        if any(not ids for ids in prompt_ids):
            raise ValueError("a prompt has no tokens; log-likelihoods need a prompt.")
        last_ids = np.asarray([ids[-1] for ids in option_ids], np.int32)
        width = len(shared) + 1  # columns: each shared token's, then the options' last one
        out = np.zeros((len(prompts), len(options)), np.float64)
        for start in range(0, len(prompts), self.score_batch_size):
            chunk = prompt_ids[start:start + self.score_batch_size]
            rows = [list(r) + list(shared) for r in chunk]
            rows += [rows[0]] * (self.rows_multiple(len(rows)) - len(rows))
            tokens, segments = self.right_padded(rows)
            first = np.asarray([len(r) - len(shared) - 1 for r in rows], np.int32)
            columns = first[:, None] + np.arange(width, dtype=np.int32)[None, :]
            targets = np.asarray([list(shared) + [0]] * len(rows), np.int32)
            values = self._options_jit(self.params, *self.place_rows(tokens, segments, columns,
                                                                     targets), last_ids)
            out[start:start + len(chunk)] = np.asarray(values, np.float64)[:len(chunk)]
        return out

    def _option_log_probs(self, params, tokens, segments, columns, targets, option_ids):
        """[B, K]: the log-probs of the shared tokens (targets[:, :-1] at columns[:, :-1]),
        summed, plus log p(option_ids[k]) at the last column."""
        with self._sharded():
            hidden = self.model.apply({"params": params}, tokens, segments)
            picked = jnp.take_along_axis(hidden, columns[..., None], axis=1)  # [B, C, D]
            logits = self.model.apply({"params": params}, picked,
                                      method=lambda m, h: m.embedder.decode(h))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, C, V]
        shared = jnp.take_along_axis(log_probs[:, :-1], targets[:, :-1, None], axis=-1)
        return jnp.sum(shared[..., 0], axis=-1)[:, None] + log_probs[:, -1][:, option_ids]

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

    def _sum_log_probs(self, params, tokens, segments, columns, targets, valid):
        """sum over valid c of log p(targets[c] | tokens up to columns[c]), per row."""
        with self._sharded():
            hidden = self.model.apply({"params": params}, tokens, segments)
            picked = jnp.take_along_axis(hidden, columns[..., None], axis=1)  # [B, C, D]
            logits = self.model.apply({"params": params}, picked,
                                      method=lambda m, h: m.embedder.decode(h))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, chosen, 0.0), axis=-1)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this GemmaDecoder has no tokenizer; pass one (or use "
                             "GemmaDecoder.from_model_dir) for text, or call the *_ids methods.")
        return self.tokenizer



def _place(tree: Any, shardings: Any) -> Any:
    """Host (or single-device) arrays onto their shardings; each device takes its slice of the
    whole array every process holds (device_put of host data to a sharding that spans
    processes is not allowed). Arrays already placed so are kept."""
    def one(value, sharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def local_partitioner(parallelism: Sequence[int] = (-1, 1, 1)):
    """A Partitioner over this process's own devices (data, fsdp, tensor; -1: the rest), for a
    decoder each process of a data job runs on its own share."""
    from gemb.partitioning import mesh
    from gemb.partitioning.partitioner import Partitioner

    return Partitioner(mesh.create_mesh(parallelism, devices=jax.local_devices()))


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text
