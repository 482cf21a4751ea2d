"""Run by test_mining.py as one process of a job of several:
  1. hard-negative mining over the job's global mesh (exact neighbours with the corpus sharded
     over every process's devices), each process scoring its own share of the queries with a
     stand-in LLM (`mine`, also called by the test in its own process as the reference);
  2. gemb's Gemma decoder (TINY) sharded over the global mesh (parameters over fsdp / tensor,
     rows over data, across the processes) against the same calls unsharded on this process's
     first device.
Prints one JSON line. argv: OUT_PATH (the mining output)."""

import json
import sys

import numpy as np

WORDS = [f"w{i}" for i in range(12)]


def embed(texts, role):
    del role
    vectors = np.array([[t.split().count(w) for w in WORDS] for t in texts], np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


class WordOverlapLLM:
    def __init__(self):
        self.calls = 0

    def log_likelihood(self, prompts, continuations):
        self.calls += 1
        return np.array([len(set(p.split()) & set(c.split())) - len(c.split())
                         for p, c in zip(prompts, continuations)], np.float64)

    def generate(self, prompts, sampling=None):
        raise AssertionError("mining only scores")


def mine(out_path, partitioner=None):
    """(summary, LLM calls) of mining 9 queries over a 45-passage corpus into out_path."""
    from gemb.data import hard_negatives as mining

    rng = np.random.default_rng(1)
    corpus = {f"d{i}": " ".join(f"w{j}" for j in rng.integers(0, 12, 6)) for i in range(45)}
    queries = [mining.MiningQuery(f"q{i}", " ".join(corpus[f"d{i}"].split()[:3]), (f"d{i}",))
               for i in range(9)]
    llm = WordOverlapLLM()
    summary = mining.mine_hard_negatives(queries, corpus, embed, llm, out_path,
                                         mining.MiningConfig(top_k=6, min_rank=2),
                                         partitioner=partitioner)
    return summary, llm.calls


def decoder_check(partitioner) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from gemb.llm.decoder import GemmaDecoder, SamplingConfig
    from gemb.models import gemma3
    from gemb.models.config import TINY

    config = TINY.replace(attention_mode="causal", sliding_window_size=6)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, TINY.vocab_size, size).tolist() for size in (5, 11, 1, 8, 3)]
    continuations = [[5, 6, 7], [9], [3, 4], [11, 12, 13, 14], [8]]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1)
    with jax.default_device(jax.local_devices()[0]):
        params = jax.device_get(nn.unbox(gemma3.Transformer(config).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
        alone = GemmaDecoder(config, params, stop_ids=(), length_multiple=8)
        want_tokens = alone.generate_ids(prompts, sampling)
        want_scores = alone.log_likelihood_ids(prompts, continuations)
    sharded = GemmaDecoder(config, params, stop_ids=(), length_multiple=8,
                           partitioner=partitioner)
    spanned = {d.process_index for leaf in jax.tree.leaves(sharded.params)
               for d in leaf.sharding.device_set}
    return {"same_tokens": sharded.generate_ids(prompts, sampling) == want_tokens,
            "max_score_diff": float(np.max(np.abs(
                sharded.log_likelihood_ids(prompts, continuations) - want_scores))),
            "params_span_processes": len(spanned) == jax.process_count()}


if __name__ == "__main__":
    from gemb import distributed

    distributed.initialize()
    import jax

    from gemb.partitioning import mesh as mesh_lib
    from gemb.partitioning.partitioner import Partitioner

    summary, calls = mine(sys.argv[1], Partitioner(mesh_lib.create_mesh()))
    decoder = decoder_check(Partitioner(mesh_lib.create_mesh((2, 2, 2))))
    print("RESULT " + json.dumps({"process": jax.process_index(), "llm_calls": calls,
                                  "summary": summary, "decoder": decoder}), flush=True)
