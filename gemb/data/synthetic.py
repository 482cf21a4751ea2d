"""Synthetic retrieval queries: an LLM writes a search query for each passage (few-shot), and an
LLM rater drops the unrealistic ones, as the Gemini Embedding recipe does.

For each passage:
  1. generate: the few-shot prompt of a `QueryPrompt` (a task description and example
     (passage, query) pairs; DEFAULT_QUERY_PROMPT is for web and code search) ending in
     "Query:", sampled with temperature 0.7, top_p 0.9, at most 32 new tokens, stopping at a
     newline, with a seed of its own (`passage_seed`: a hash of the run's seed and the
     passage's id), so a rerun or a resumed run writes the same queries;
  2. clean: the reply's first line, stripped (of a "Query:" label and quotes too); an empty
     reply or one with no letter or digit is "unparseable_reply" (dropped, counted, the first
     one logged);
  3. rate: the expected grade 0..3 of REALISM_PROMPT under the LLM's probabilities of " 0" ..
     " 3" (gemb.data.hard_negatives.expected_grade, the trick of its graded relevance);
     queries rated below `threshold` are dropped ("below_threshold").

Outputs in one folder: kept.jsonl {id, query, positive (the passage), realism} (a jsonl source
for `gemb train`: sources.PairBuilder reads query / positive), dropped.jsonl (the same with
"reason", and "reply" for an unparseable one) and summary.json (counts, drop rate). Input:
JSONL of passages {id?, text}; a passage's id is its "id" or else its line number ("line:N").
Resumable after a crash (gemb.data.resumable): passages already in either output are skipped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
from typing import Optional, Sequence

import numpy as np

from gemb.data import resumable
from gemb.data.hard_negatives import (GRADE_OUTSIDE_SCALE, count_unusable_grades,
                                      expected_grade)
from gemb.data.llm_filter import check_text
from gemb.progress import Progress

log = logging.getLogger(__name__)

REALISM_PROMPT = (
    "Rate how realistic the search query is: would a person looking for this passage type it "
    "into a search engine? From 0 (not a real query: garbled, copied from the passage, or about "
    "something else) to 3 (a natural, specific query that the passage answers).\n"
    "Passage: {passage}\nQuery: {query}\nRating:")


@dataclasses.dataclass(frozen=True)
class QueryPrompt:
    """The few-shot prompt: `task` (what to write), then each (passage, query) example, then
    the passage and "Query:" for the LLM to complete (`render`)."""

    task: str
    examples: tuple[tuple[str, str], ...] = ()

    def render(self, passage: str) -> str:
        parts = [self.task, ""]
        for example_passage, example_query in self.examples:
            parts += [f"Passage: {example_passage}", f"Query: {example_query}", ""]
        parts += [f"Passage: {passage}", "Query:"]
        return "\n".join(parts)

    @classmethod
    def from_json(cls, path: str) -> "QueryPrompt":
        """A prompt from a JSON file {"task": str, "examples": [[passage, query], ...]}."""
        from gemb import paths

        value = json.loads(paths.as_path(path).read_text(encoding="utf-8"))
        try:
            return cls(str(value["task"]), tuple((str(p), str(q)) for p, q in
                                                 value.get("examples", [])))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: a query prompt is {{\"task\": text, \"examples\": "
                             f"[[passage, query], ...]}} ({error!r}).") from None


DEFAULT_QUERY_PROMPT = QueryPrompt(
    task="Write the search query that a user would type into a web or code search engine to "
         "find the passage. Queries are short and specific, written the way people search.",
    examples=(
        ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is "
         "named after the engineer Gustave Eiffel, whose company designed and built it from "
         "1887 to 1889.",
         "who built the eiffel tower"),
        ("def read_lines(path):\n    with open(path) as f:\n        return [line.rstrip('\\n') "
         "for line in f]",
         "python read file into list of lines without newlines"),
        ("To reset the router to its factory settings, hold the reset button on the back for "
         "10 seconds until the lights blink, then sign in at 192.168.1.1 with the password on "
         "the label.",
         "how to factory reset router"),
    ))


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """threshold: queries rated >= this (realism, 0..3) are kept. Sampling: temperature, top_p,
    max_new_tokens, and `seed` (each passage's own seed derives from it and the passage's id).
    max_passage_chars: passages are cut to this in the prompts (kept whole as the positive).
    batch_size: passages per step (generated, then rated in one log_likelihood call).
    concurrency: generations in flight at once (each passage is its own generate call, for its
    own seed): 1 for the in-process decoder, e.g. 16 for a server (`gemb llm serve`, vLLM).
    prompt: the few-shot prompt."""

    threshold: float = 1.5
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 32
    seed: int = 0
    max_passage_chars: int = 2000
    batch_size: int = 16
    concurrency: int = 1
    prompt: QueryPrompt = DEFAULT_QUERY_PROMPT

    def __post_init__(self):
        if not 0 <= self.threshold <= 3:
            raise ValueError(f"threshold={self.threshold} must be within the grades 0..3.")
        if min(self.max_passage_chars, self.batch_size, self.concurrency) < 1:
            raise ValueError(f"{self}: max_passage_chars, batch_size and concurrency must be "
                             ">= 1.")

    def sampling(self, seed: int):
        from gemb.llm.decoder import SamplingConfig

        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=("\n",), seed=seed)


def passage_seed(run_seed: int, passage_id: str) -> int:
    """The sampling seed of one passage: a hash of the run's seed and its id (not of its place
    in the input or in a batch, so resuming or reordering changes nothing), in [0, 2**31)."""
    digest = hashlib.blake2b(f"{run_seed}\0{passage_id}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << 31)


def clean_reply(reply: str, label: str = "Query") -> Optional[str]:
    """The answer in an LLM reply: its first non-blank line, stripped of a "<label>:" prefix
    and of quotes; None when nothing usable is left (empty, or no letter or digit)."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if not lines:
        return None
    answer = lines[0]
    prefix = f"{label.lower()}:"
    if answer.lower().startswith(prefix):
        answer = answer[len(prefix):].strip()
    answer = answer.strip("\"'`").strip()
    return answer if any(character.isalnum() for character in answer) else None


def generate_each(llm, prompts: Sequence[str], samplings: Sequence, pool=None) -> list[str]:
    """One generate call per prompt, each with its own SamplingConfig (its own seed, so a
    reply does not depend on the batch it came in); `pool` (an Executor) keeps several calls
    in flight, for a server. Replies in order."""
    def one(pair):
        return llm.generate([pair[0]], pair[1])[0]

    pairs = list(zip(prompts, samplings))
    return list(pool.map(one, pairs)) if pool is not None else [one(pair) for pair in pairs]


def check_passage(number: int, record: Optional[dict], input_path: str,
                  config: SynthesisConfig, bad: resumable.KindCounter
                  ) -> Optional[tuple[str, tuple[str, str, str]]]:
    """One input line -> (its id, the batch item (id, passage, text for the prompts)), or None
    (counted in `bad`) when it holds no usable passage. Duplicate ids are the caller's."""
    where = f"{input_path}:{number}"
    text = None if record is None else check_text(
        record, "text", config.max_passage_chars, where, bad)
    if text is None:
        return None
    passage_id = resumable.record_id(record, number)
    return passage_id, (passage_id, record["text"], text)


def synthesize_batch(llm, batch: Sequence[tuple[str, str, str]], config: SynthesisConfig,
                     replies: resumable.KindCounter, pool=None
                     ) -> list[tuple[dict, Optional[str]]]:
    """Generate, clean and rate the queries of some passages (id, passage, text for the
    prompts): (record, None) to keep or (record, reason) to drop, in order. The one per-batch
    step of the in-process stage and of the Beam pipeline (gemb.data.llm_beam)."""
    replies_in_order = generate_each(
        llm, [config.prompt.render(text) for _, _, text in batch],
        [config.sampling(passage_seed(config.seed, passage_id)) for passage_id, _, _ in batch],
        pool)
    queries = []
    for (passage_id, _, _), reply in zip(batch, replies_in_order):
        query = clean_reply(reply)
        if query is None:
            replies.count("unparseable_reply",
                          f"passage {passage_id!r}: the reply {reply!r} holds no query")
        queries.append((query, reply))
    rated = [(i, q) for i, (q, _) in enumerate(queries) if q is not None]
    grades = expected_grade(llm, [REALISM_PROMPT.format(passage=batch[i][2], query=q)
                                  for i, q in rated]) if rated else []
    count_unusable_grades(np.asarray(grades, np.float64), replies, "synthesize-queries")
    realism = {i: float(g) for (i, _), g in zip(rated, grades)}
    out = []
    for i, ((passage_id, passage, _), (query, reply)) in enumerate(zip(batch, queries)):
        if query is None:
            out.append(({"id": passage_id, "reply": reply, "positive": passage,
                         "realism": None}, "unparseable_reply"))
            continue
        if np.isnan(realism[i]):
            out.append(({"id": passage_id, "query": query, "positive": passage,
                         "realism": None}, GRADE_OUTSIDE_SCALE))
            continue
        record = {"id": passage_id, "query": query, "positive": passage,
                  "realism": round(realism[i], 6)}
        out.append((record, None if realism[i] >= config.threshold else "below_threshold"))
    return out


def synthesize_queries(input_path: str, llm, out_dir: str,
                       config: SynthesisConfig = SynthesisConfig(),
                       max_passages: Optional[int] = None) -> dict:
    """Runs the stage (module docstring) over the first max_passages passages; returns the
    summary it also writes. llm: a gemb.llm.interface.LLM (generate and log_likelihood)."""
    bad = resumable.KindCounter(log, "bad passage")
    counts = {"read": 0, "already_done": 0, "generated": 0}
    total = resumable.count_input_lines(input_path, max_passages)

    with contextlib.ExitStack() as stack:
        pool = (stack.enter_context(concurrent.futures.ThreadPoolExecutor(config.concurrency))
                if config.concurrency > 1 else None)
        output = stack.enter_context(resumable.KeptAndDropped(out_dir))
        progress = stack.enter_context(Progress(total, "synthesizing queries", unit="passage"))
        replies = resumable.KindCounter(log, "bad LLM reply")
        replies.counts.update({kind: output.dropped_by_reason.get(kind, 0)
                               for kind in ("unparseable_reply", GRADE_OUTSIDE_SCALE)})

        def run(batch):
            for record, reason in synthesize_batch(llm, batch, config, replies, pool):
                if reason is None:
                    output.keep(record)
                else:
                    output.drop(record, reason)
            counts["generated"] += len(batch)
            progress.update(len(batch))

        def check(number, record):
            return check_passage(number, record, input_path, config, bad)

        resumable.process_in_batches(input_path, check, output.done, counts, bad, progress,
                                     config.batch_size, run, max_passages)

    summary = {"stage": "synthesize-queries", "input": str(input_path),
               "config": dataclasses.asdict(config), **counts, **output.totals(),
               "bad_passages": bad.as_dict(),
               "bad_replies": {"unparseable_reply": 0, GRADE_OUTSIDE_SCALE: 0,
                               **replies.as_dict()}}
    output.write_summary(summary)
    return summary


def build_parser():
    """The stage's flags (also `gemb data beam synthesize-queries`'s)."""
    import argparse

    from gemb.llm.interface import add_llm_argument

    parser = argparse.ArgumentParser(
        prog="gemb data synthesize-queries",
        description="Write a search query for each passage with an LLM (few-shot), rate its "
                    "realism 0..3 with the LLM and keep those at or above --threshold: "
                    "DIR/kept.jsonl {id, query, positive, realism} (a jsonl source for gemb "
                    "train), DIR/dropped.jsonl, DIR/summary.json. Resumable: rerun the same "
                    "command after a crash.")
    parser.add_argument("--input", required=True,
                        help="JSONL of passages {id?, text} (local or gs://)")
    add_llm_argument(parser)
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--threshold", type=float, default=SynthesisConfig.threshold)
    parser.add_argument("--max_passages", type=int)
    parser.add_argument("--prompt", help='JSON file {"task": ..., "examples": [[passage, '
                                         'query], ...]} replacing the default few-shot prompt')
    parser.add_argument("--seed", type=int, default=SynthesisConfig.seed)
    parser.add_argument("--temperature", type=float, default=SynthesisConfig.temperature)
    parser.add_argument("--top_p", type=float, default=SynthesisConfig.top_p)
    parser.add_argument("--max_new_tokens", type=int, default=SynthesisConfig.max_new_tokens)
    parser.add_argument("--max_passage_chars", type=int,
                        default=SynthesisConfig.max_passage_chars)
    parser.add_argument("--batch_size", type=int, default=SynthesisConfig.batch_size)
    parser.add_argument("--concurrency", type=int, default=SynthesisConfig.concurrency,
                        help="generate requests in flight (for a server --llm)")
    return parser


def config_from_args(args) -> SynthesisConfig:
    return SynthesisConfig(
        threshold=args.threshold, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
        max_passage_chars=args.max_passage_chars, batch_size=args.batch_size,
        concurrency=args.concurrency,
        prompt=QueryPrompt.from_json(args.prompt) if args.prompt else DEFAULT_QUERY_PROMPT)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gemb.llm.interface import llm_from_args

    summary = synthesize_queries(args.input, llm_from_args(args), args.out,
                                 config_from_args(args), args.max_passages)
    print(json.dumps(summary), flush=True)
    return 0
