"""The LLM data stages as Apache Beam pipelines, for corpus scale: `gemb data beam STAGE`.

    gemb data beam filter-pairs --input gs://b/pairs.jsonl --llm http://10.0.0.5:8000 \\
        --out gs://b/pairs_filtered --num_shards 64 [-- --runner=DataflowRunner ...]
    gemb data beam synthesize-queries --input data/passages.jsonl --llm models/gemma3-27b \\
        --out data/synthetic --num_shards 8
    gemb data beam synthesize-classification --task banking.json --llm URL --out DIR
    gemb data beam mine-negatives --beir data/msmarco --split train --embedder runs/s1/model \\
        --llm http://10.0.0.5:8000 --out data/msmarco_negatives --num_shards 16

STAGE is filter-pairs, synthesize-queries, synthesize-classification or mine-negatives, with the
in-process command's flags (gemb.data.llm_filter, gemb.data.synthetic,
gemb.data.synthetic_classification, gemb.data.hard_negatives) plus --num_shards; mining
retrieves in the launching process (the embedder on its accelerators) and only its LLM half,
per query, is the pipeline (`mine_one`, the in-process function). Everything after `--` is
Beam's own pipeline options (the DirectRunner's in-process engine by default, as `gemb data
prepare`).

Each worker makes ONE LLM, in its DoFn's setup, from the --llm spec (`make_llm`): a model
folder is loaded once per worker, a server URL is shared by every worker. Records go to it in
batches of --batch_size (beam.BatchElements) through the SAME per-batch function the in-process
stage calls (`llm_filter.judge_batch`, `synthetic.synthesize_batch`,
`synthetic_classification.list_batch` / `text_batch`), after the same per-record checks
(`check_pair`, `check_passage`) and the same first-occurrence rule for duplicate ids, so the
kept and dropped records are those of the in-process stage, record for record (sampling seeds
derive from ids, never from batches).

Outputs in --out (local or gs://): `kept-SSSSS-of-NNNNN.jsonl` and `dropped-...` shards
(synthesize-classification: `lists-...` too), each record in the shard of a hash of its id and
the shards sorted in input order, every shard written even when empty; and summary.json (the
in-process summary's counts, summed over workers, with "runner": "beam"). The counts are Beam
metrics too (namespace "gemb"). A pipeline does not resume: Beam retries failed bundles
itself; a rerun rewrites --out (use a fresh folder).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from gemb import paths
from gemb.data import hard_negatives, llm_filter, resumable, synthetic
from gemb.data import synthetic_classification as classification

log = logging.getLogger(__name__)

COUNTS = "counts"  # the tagged output of every step's counts
KEPT, DROPPED, LISTS, NEGATIVES = "kept", "dropped", "lists", "negatives"


class CountingKinds(resumable.KindCounter):
    """A KindCounter (first of each kind logged, per worker) that also hands over what it
    counted since the last `take`, for a step to emit as counts."""

    def __init__(self, logger: logging.Logger, what: str):
        super().__init__(logger, what)
        self.pending: collections.Counter[str] = collections.Counter()

    def count(self, kind: str, detail: str = "") -> None:
        super().count(kind, detail)
        self.pending[kind] += 1

    def take(self, prefix: str) -> dict[str, int]:
        taken = {prefix + kind: n for kind, n in self.pending.items()}
        self.pending.clear()
        return taken


@dataclasses.dataclass(frozen=True)
class JsonlStage:
    """A stage over JSONL input records.

    check: (line number, record or None, input path, config, bad) -> (id, batch item) or None
      (the in-process stage's per-record check). run_batch: (llm, items, config, replies, pool)
      -> [(record, None to keep | drop reason)] (its per-batch step). processed_key, bad_key,
      reply_key: the summary's names of the records sent to the LLM, of the bad inputs and of
      the bad LLM replies (None: the stage parses no reply)."""

    name: str
    config: Any
    check: Callable
    run_batch: Callable
    processed_key: str
    bad_key: str
    reply_key: Optional[str] = None
    reply_kinds: tuple[str, ...] = ()  # bad-reply kinds the summary lists even at 0


def _judge(llm, items, config, replies, pool):
    del pool  # the judge makes one log_likelihood call
    return llm_filter.judge_batch(llm, items, config, replies)


def filter_pairs_stage(config: llm_filter.FilterConfig) -> JsonlStage:
    return JsonlStage("filter-pairs", config, llm_filter.check_pair, _judge, "scored",
                      "bad_records", "bad_replies", (hard_negatives.GRADE_OUTSIDE_SCALE,))


def synthesize_queries_stage(config: synthetic.SynthesisConfig) -> JsonlStage:
    return JsonlStage("synthesize-queries", config, synthetic.check_passage,
                      synthetic.synthesize_batch, "generated", "bad_passages", "bad_replies",
                      ("unparseable_reply", hard_negatives.GRADE_OUTSIDE_SCALE))


def shard_of(identifier: str, num_shards: int) -> int:
    """A record's shard: a hash of its id (balanced, and the same on every runner)."""
    digest = hashlib.blake2b(str(identifier).encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def shard_name(kind: str, index: int, num_shards: int) -> str:
    return f"{kind}-{index:05d}-of-{num_shards:05d}.jsonl"


def sum_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for part in parts:
        total.update(part)
    return dict(total)


def _kinds(counts: Mapping[str, int], prefix: str) -> dict[str, int]:
    return dict(sorted((k[len(prefix):], n) for k, n in counts.items() if k.startswith(prefix)))


# ------------------------------------------------------------------------ pipeline pieces


def _emit_counts(beam, counts: Mapping[str, int]):
    for name, value in counts.items():
        beam.metrics.Metrics.counter("gemb", name).inc(value)
    return beam.pvalue.TaggedOutput(COUNTS, dict(counts))


def _run_batches(beam, items, step: str, run_batch: Callable, config: Any, llm_spec,
                 batch_size: int, concurrency: int = 1, prefix: str = ""):
    """(order, item) elements -> (results: (order, record, reason), counts). One LLM per
    worker (DoFn.setup); batches of batch_size per bundle."""

    class RunBatch(beam.DoFn):
        def setup(self):
            from gemb.llm.interface import make_llm

            self.llm = make_llm(llm_spec)
            self.replies = CountingKinds(log, "bad LLM reply")
            self.pool = (concurrent.futures.ThreadPoolExecutor(concurrency)
                         if concurrency > 1 else None)

        def teardown(self):
            if getattr(self, "pool", None) is not None:
                self.pool.shutdown()

        def process(self, batch) -> Iterable[Any]:
            results = run_batch(self.llm, [item for _, item in batch], config, self.replies,
                                self.pool)
            counts = collections.Counter({prefix + "processed": len(batch)})
            for (order, _), (record, reason) in zip(batch, results):
                counts[prefix + (KEPT if reason is None else f"{DROPPED}/{reason}")] += 1
                yield order, record, reason
            counts.update(self.replies.take("bad_reply/"))
            yield _emit_counts(beam, counts)

    outputs = (items
               | f"Batch {step}" >> beam.BatchElements(min_batch_size=batch_size,
                                                      max_batch_size=batch_size)
               | f"Run {step}" >> beam.ParDo(RunBatch()).with_outputs(COUNTS, main="results"))
    return outputs.results, outputs[COUNTS]


def _write_shards(beam, results, step: str, out: str, num_shards: int,
                  kind_of: Callable[[Optional[str]], str], id_key: str = "id"):
    """(order, record, reason) -> shards `kind-SSSSS-of-NNNNN.jsonl` (kind_of(reason)), each
    sorted by order; a dropped record gets its "reason" (as KeptAndDropped.drop writes it).
    Returns the (kind, index) of the shards written."""

    def keyed(result):
        _, record, reason = result
        return (kind_of(reason), shard_of(record[id_key], num_shards)), result

    def write(element):
        (kind, index), shard = element
        folder = paths.as_path(out)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(record if kind != DROPPED else {**record, "reason": reason}) + "\n"
                 for _, record, reason in sorted(shard, key=lambda result: result[0])]
        (folder / shard_name(kind, index, num_shards)).write_text("".join(lines),
                                                                  encoding="utf-8")
        return kind, index

    return (results
            | f"By shard {step}" >> beam.Map(keyed)
            | f"Group shards {step}" >> beam.GroupByKey()
            | f"Write shards {step}" >> beam.Map(write))


def _write_summary(beam, pipeline, counts: Sequence, written: Sequence, out: str,
                   num_shards: int, kinds: Sequence[str],
                   summarize: Callable[[dict[str, int]], dict]) -> None:
    """After every shard is written: the empty shards, then summary.json."""

    def finish(_, totals, done):
        folder = paths.as_path(out)
        folder.mkdir(parents=True, exist_ok=True)
        done = set(done)
        for kind in kinds:
            for index in range(num_shards):
                if (kind, index) not in done:
                    (folder / shard_name(kind, index, num_shards)).write_text("")
        summary = summarize(totals)
        (folder / resumable.SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n",
                                                     encoding="utf-8")

    totals = (counts | "Flatten counts" >> beam.Flatten()
              | "Sum counts" >> beam.CombineGlobally(sum_counts))
    done = written | "Flatten written" >> beam.Flatten()
    (pipeline
     | "Once" >> beam.Create([None])
     | "Write summary" >> beam.Map(finish, beam.pvalue.AsSingleton(totals),
                                   beam.pvalue.AsList(done)))


def _kept_or_dropped(reason: Optional[str]) -> str:
    return KEPT if reason is None else DROPPED


# --------------------------------------------------------------------------- the pipelines


def build_jsonl_pipeline(pipeline, stage: JsonlStage, input_path: str, llm_spec, out: str,
                         num_shards: int, max_records: Optional[int] = None) -> None:
    """Adds a JSONL stage (filter-pairs, synthesize-queries) to a Beam pipeline."""
    import apache_beam as beam

    config = stage.config

    def read(path) -> Iterable[Any]:  # (Any: it also yields the tagged counts)
        # One reader for the file (line numbers are ids); the LLM work after it is spread.
        bad = CountingKinds(log, "bad record")
        read_count = 0
        for number, record in resumable.read_input_records(path, bad, max_records):
            read_count += 1
            checked = stage.check(number, record, path, config, bad)
            if checked is not None:
                identifier, item = checked
                yield identifier, (number, item)
        yield _emit_counts(beam, {"read": read_count, **bad.take("bad_input/")})

    duplicates = CountingKinds(log, "bad record")

    def first_of_each_id(element) -> Iterable[Any]:
        # As in-process: the first (lowest line) of the usable records with an id is judged.
        identifier, occurrences = element
        occurrences = sorted(occurrences, key=lambda occurrence: occurrence[0])
        for number, _ in occurrences[1:]:
            duplicates.count("duplicate_id", f"{input_path}:{number}: id {identifier!r} again "
                                             f"(the first, line {occurrences[0][0]}, is kept)")
        counts = duplicates.take("bad_input/")
        if counts:
            yield _emit_counts(beam, counts)
        yield occurrences[0]

    read_outputs = (pipeline
                    | "Input" >> beam.Create([str(input_path)])
                    | "Read" >> beam.FlatMap(read).with_outputs(COUNTS, main="items"))
    unique = (read_outputs.items
              | "Group ids" >> beam.GroupByKey()
              | "First of each id" >> beam.FlatMap(first_of_each_id).with_outputs(
                  COUNTS, main="items"))
    items = unique.items | "Spread" >> beam.Reshuffle()
    results, run_counts = _run_batches(
        beam, items, "records", stage.run_batch, config, llm_spec, config.batch_size,
        getattr(config, "concurrency", 1))
    written = _write_shards(beam, results, "records", out, num_shards, _kept_or_dropped)

    def summarize(counts):
        summary = {"stage": stage.name, "input": str(input_path),
                   "config": dataclasses.asdict(config), "runner": "beam",
                   "num_shards": num_shards, "read": counts.get("read", 0),
                   stage.processed_key: counts.get("processed", 0),
                   **resumable.kept_and_dropped_totals(counts.get(KEPT, 0),
                                                       _kinds(counts, DROPPED + "/")),
                   stage.bad_key: _kinds(counts, "bad_input/")}
        if stage.reply_key:
            summary[stage.reply_key] = {**dict.fromkeys(stage.reply_kinds, 0),
                                        **_kinds(counts, "bad_reply/")}
        return summary

    _write_summary(beam, pipeline, (read_outputs[COUNTS], unique[COUNTS], run_counts),
                   (written,), out, num_shards, (KEPT, DROPPED), summarize)


def _lists(llm, labels, arguments, replies, pool):
    task, config = arguments
    return [(record, record.get("reason"))
            for record in classification.list_batch(llm, task, labels, config, replies, pool)]


def _texts(llm, items, arguments, replies, pool):
    task, config = arguments
    return classification.text_batch(llm, task, items, config, replies, pool)


def build_classification_pipeline(pipeline, task: classification.ClassificationTask,
                                  config: classification.ClassificationSynthesisConfig,
                                  llm_spec, out: str, num_shards: int) -> None:
    """Adds synthesize-classification to a Beam pipeline: lists per label, then texts per
    sampled item (ordered by (label, position), as in-process)."""
    import apache_beam as beam

    labels = (pipeline
              | "Labels" >> beam.Create([(index, label)
                                         for index, label in enumerate(task.labels)])
              | "Spread labels" >> beam.Reshuffle())
    lists, list_counts = _run_batches(beam, labels, "lists", _lists, (task, config), llm_spec,
                                      config.batch_size, config.concurrency, prefix="lists/")

    def sampled(result) -> Iterable[Any]:
        order, record, _ = result
        items = classification.sampled_items([record])
        yield _emit_counts(beam, {"items_listed": len(record["items"]),
                                  "items_sampled": len(items)})
        for position, item in zip(record["sampled"], items):
            yield (order, position), item

    expanded = lists | "Sampled items" >> beam.FlatMap(sampled).with_outputs(COUNTS,
                                                                             main="items")
    items = expanded.items | "Spread items" >> beam.Reshuffle()
    texts, text_counts = _run_batches(beam, items, "texts", _texts, (task, config), llm_spec,
                                      config.batch_size, config.concurrency)
    written = (_write_shards(beam, lists, "lists", out, num_shards, lambda _: LISTS),
               _write_shards(beam, texts, "texts", out, num_shards, _kept_or_dropped))

    def summarize(counts):
        return {"stage": "synthesize-classification",
                "task": {**dataclasses.asdict(task), "labels": list(task.labels)},
                "config": dataclasses.asdict(config), "runner": "beam",
                "num_shards": num_shards, "labels": len(task.labels),
                "lists_generated": counts.get("lists/processed", 0),
                "lists_unparseable": counts.get("lists/dropped/unparseable_reply", 0),
                "items_listed": counts.get("items_listed", 0),
                "items_sampled": counts.get("items_sampled", 0),
                "texts_generated": counts.get("processed", 0),
                **resumable.kept_and_dropped_totals(counts.get(KEPT, 0),
                                                    _kinds(counts, DROPPED + "/")),
                "bad_replies": {"unparseable_reply": 0, **_kinds(counts, "bad_reply/")}}

    _write_summary(beam, pipeline, (list_counts, expanded[COUNTS], text_counts), written, out,
                   num_shards, (LISTS, KEPT, DROPPED), summarize)


def build_mining_pipeline(pipeline, items: Sequence, llm_spec, out: str, num_shards: int,
                          config, input_counts: Mapping[str, int]) -> None:
    """Adds hard-negative mining's LLM half to a Beam pipeline: the retrieved candidates of
    every query (`hard_negatives.retrieve_candidates`, run before, on the accelerator) are
    spread over the workers, each scoring its queries with `hard_negatives.mine_one`."""
    import apache_beam as beam

    class Mine(beam.DoFn):
        def setup(self):
            from gemb.llm.interface import make_llm

            self.llm = make_llm(llm_spec)
            self.cuts = CountingKinds(log, "LLM prompt input")

        def process(self, element) -> Iterable[Any]:
            order, item = element
            record = hard_negatives.mine_one(item, self.llm, config, self.cuts)
            yield order, record, None
            yield _emit_counts(beam, {**hard_negatives.count_mined(item, record),
                                      **self.cuts.take("")})

    mined = (pipeline
             | "Queries" >> beam.Create(list(enumerate(items)))
             | "Spread" >> beam.Reshuffle()
             | "Mine" >> beam.ParDo(Mine()).with_outputs(COUNTS, main="results"))
    written = _write_shards(beam, mined.results, "queries", out, num_shards,
                            lambda _: NEGATIVES, id_key="query_id")

    def summarize(counts):
        return {"config": dataclasses.asdict(config), **input_counts,
                **{name: counts.get(name, 0) for name in hard_negatives.MINE_COUNTS},
                "runner": "beam", "num_shards": num_shards}

    _write_summary(beam, pipeline, (mined[COUNTS],), (written,), out, num_shards, (NEGATIVES,),
                   summarize)


# ----------------------------------------------------------------------------- running


def _import_beam():
    try:
        import apache_beam
    except ImportError:
        raise SystemExit("gemb data beam needs Apache Beam: pip install 'gemb[prepare]' (or run "
                         "the stage in this process: gemb data STAGE).") from None
    return apache_beam


def run(build: Callable, out: str, num_shards: int, beam_args: Sequence[str] = ()) -> dict:
    """Runs build(pipeline) on the runner `beam_args` name (default: the DirectRunner's
    in-process engine, as `gemb data prepare`); returns the summary it wrote."""
    beam = _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    from gemb.data.prepare import default_runner

    if num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
    with beam.Pipeline(runner=default_runner(beam_args),
                       options=PipelineOptions(list(beam_args))) as pipeline:
        build(pipeline)
    return json.loads((paths.as_path(out) / resumable.SUMMARY_NAME).read_text(encoding="utf-8"))


def filter_pairs(input_path: str, llm_spec, out: str,
                 config: llm_filter.FilterConfig = llm_filter.FilterConfig(),
                 max_records: Optional[int] = None, num_shards: int = 1,
                 beam_args: Sequence[str] = ()) -> dict:
    """`llm_filter.filter_pairs` as a Beam pipeline. llm_spec: what make_llm takes (a model
    folder, a URL, or an LLM object the runner can pickle)."""
    return run(lambda p: build_jsonl_pipeline(p, filter_pairs_stage(config), input_path,
                                              llm_spec, str(out), num_shards, max_records),
               out, num_shards, beam_args)


def synthesize_queries(input_path: str, llm_spec, out: str,
                       config: synthetic.SynthesisConfig = synthetic.SynthesisConfig(),
                       max_passages: Optional[int] = None, num_shards: int = 1,
                       beam_args: Sequence[str] = ()) -> dict:
    """`synthetic.synthesize_queries` as a Beam pipeline."""
    return run(lambda p: build_jsonl_pipeline(p, synthesize_queries_stage(config), input_path,
                                              llm_spec, str(out), num_shards, max_passages),
               out, num_shards, beam_args)


def synthesize_classification(task: classification.ClassificationTask, llm_spec, out: str,
                              config: classification.ClassificationSynthesisConfig =
                              classification.ClassificationSynthesisConfig(),
                              num_shards: int = 1, beam_args: Sequence[str] = ()) -> dict:
    """`synthetic_classification.synthesize_classification` as a Beam pipeline."""
    return run(lambda p: build_classification_pipeline(p, task, config, llm_spec, str(out),
                                                       num_shards),
               out, num_shards, beam_args)


def mine_negatives(queries, corpus, embed, llm_spec, out: str, config=None,
                   num_shards: int = 1, beam_args: Sequence[str] = (), partitioner=None) -> dict:
    """`hard_negatives.mine_hard_negatives` with its LLM half as a Beam pipeline: retrieval in
    this process, then `negatives-SSSSS-of-NNNNN.jsonl` shards in `out` (read_beir's
    hard_negatives_path takes their glob) and summary.json."""
    from gemb.data import hard_negatives

    config = config or hard_negatives.MiningConfig()
    todo, input_counts = hard_negatives.pending_queries(queries, corpus, set())
    items = hard_negatives.retrieve_candidates(todo, corpus, embed, config, partitioner)
    return run(lambda p: build_mining_pipeline(p, items, llm_spec, str(out), num_shards, config,
                                               input_counts),
               out, num_shards, beam_args)


STAGE_MODULES = {"filter-pairs": llm_filter, "synthesize-queries": synthetic,
                 "synthesize-classification": classification, "mine-negatives": hard_negatives}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGE_MODULES:
        print(f"usage: gemb data beam {{{','.join(STAGE_MODULES)}}} [the stage's flags] "
              "[--num_shards N] [-- Beam pipeline options, e.g. --runner=DataflowRunner]\n"
              "(gemb data STAGE --help lists a stage's flags)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    stage, argv = argv[0], argv[1:]
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    module = STAGE_MODULES[stage]
    parser = module.build_parser()
    parser.prog = f"gemb data beam {stage}"
    parser.description += (" As an Apache Beam pipeline: --out may be gs://, the outputs are "
                           "shards (KIND-SSSSS-of-NNNNN.jsonl); arguments after `--` are Beam "
                           "pipeline options (default: the DirectRunner's in-process engine).")
    parser.add_argument("--num_shards", type=int, default=1, help="shards per output file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if stage == "synthesize-classification":
        try:
            task, config = classification.task_and_config_from_args(args)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        summary = synthesize_classification(task, args.llm, args.out, config, args.num_shards,
                                            beam_args)
    elif stage == "mine-negatives":
        # Retrieval runs here (on this machine's accelerators); the LLM scoring is the pipeline.
        queries, corpus, embed, partitioner = module.inputs_from_args(args)
        summary = mine_negatives(queries, corpus, embed, args.llm, args.out,
                                 module.config_from_args(args), args.num_shards, beam_args,
                                 partitioner)
    elif stage == "filter-pairs":
        summary = filter_pairs(args.input, args.llm, args.out, module.config_from_args(args),
                               args.max_records, args.num_shards, beam_args)
    else:
        summary = synthesize_queries(args.input, args.llm, args.out,
                                     module.config_from_args(args), args.max_passages,
                                     args.num_shards, beam_args)
    print(json.dumps(summary), flush=True)
    return 0
