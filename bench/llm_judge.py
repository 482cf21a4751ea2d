"""The LLM judge's cost on the real Gemma 3 270M: expected_grade over the relevance prompts of
6 CoSQA functions per query, with the four grades scored as four sequences each
(log_likelihood, what a server is asked) and from one pass per prompt (option_log_probs).
Prints seconds per query after every shape has compiled, and the grades of both paths.

    python bench/llm_judge.py
"""

import json
import time

import numpy as np

from gemb import paths
from gemb.data import hard_negatives
from gemb.llm.decoder import GemmaDecoder
from gemb.train import gin_registry


class PairsOnly:
    """The decoder without option_log_probs: the four-sequences path."""

    def __init__(self, decoder):
        self.decoder = decoder

    def log_likelihood(self, prompts, continuations):
        return self.decoder.log_likelihood(prompts, continuations)


def main():
    decoder = GemmaDecoder.from_model_dir(gin_registry.converted_model("gemma3-270m"))
    corpus_path = paths.shared_data_root() / "cosqa" / "corpus.jsonl"
    corpus = [json.loads(line)["text"][:600] for line in corpus_path.open()][:60]
    query = "python check if a variable is iterable"

    def prompts(i):
        return [hard_negatives.RELEVANCE_PROMPT.format(query=query, passage=p)
                for p in corpus[i:i + 6]]

    for name, judge in (("4 sequences per prompt", PairsOnly(decoder)),
                        ("one pass per prompt", decoder)):
        for i in range(6, 60, 6):  # compile every shape: the timed pass is the steady state
            hard_negatives.expected_grade(judge, prompts(i))
        start = time.time()
        grades = [hard_negatives.expected_grade(judge, prompts(i)) for i in range(6, 60, 6)]
        print(f"{name}: {(time.time() - start) / 9:.2f} s per query of 6 candidates; grades "
              f"of the last query {np.round(grades[-1], 4).tolist()}")


if __name__ == "__main__":
    main()
