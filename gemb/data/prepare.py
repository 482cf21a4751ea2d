"""`gemb data prepare`: tokenise a task once, offline, into sharded ArrayRecord files.

An Apache Beam pipeline (seqio's cache_tasks_main does the same job for seqio caches): it reads
a task's raw sources (JSONL / TSV / CSV files or globs, a BEIR folder, a TFDS split, the
docstring corpus; local or gs://), applies the task's bad-record policy, template and
tokenizer, drops exact duplicate (query, positive) pairs, and writes each split as N shards of
pre-tokenised records plus info.json (gemb.data.prepared). Training then reads the folder by
streaming (gemb.data.streaming) with no tokenizer and no TensorFlow.

    gemb data prepare --task gemb_snli_triplets --tokenizer models/gemma3-270m \\
        --output data/prepared/snli --num_shards 8
    gemb data prepare --name my_pairs --format jsonl --split train='gs://b/pairs/*.jsonl' \\
        --query_field title --positive_field passage --template search \\
        --tokenizer gs://b/models/gemma3-1b --output gs://b/prepared/my_pairs --num_shards 1024 \\
        -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp \\
           --setup_file=./setup.py

Everything after `--` is Beam's own pipeline options (DirectRunner by default).

The pipeline is deterministic: an example's id is (read unit, record number), its shard is a
hash of its id, records are sorted by id inside their shard, and info.json has no timestamps,
so preparing the same inputs again writes the same bytes, on any runner. `prepare_in_process`
runs the same steps without Beam (the reference the tests compare the pipeline with).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from gemb import paths
from gemb.data import prepared, quality, sources, templates
from gemb.data.quality import QualityPolicy, RejectRecord

log = logging.getLogger(__name__)

# An example id is (read unit index << UNIT_BITS) | record number within the unit.
UNIT_BITS = 40
ROLES = ("query", "positive", "negatives")


@dataclasses.dataclass(frozen=True)
class PrepareSpec:
    """What `gemb data prepare` turns into a prepared folder.

    Attributes:
      task: the task's name (recorded in info.json; the name a run registers it under).
      source: where the raw records are (gemb.data.sources.SourceSpec).
      builder: raw record -> Example (gemb.data.sources builders).
      template: the task's prompts.
      tokenizer: a tokenizer.model / tokenizer.json, or a model folder holding one.
      num_negatives: K, hard-negative slots kept per example.
      policy: what bad records do (counted and dropped, or fatal).
      dedupe: drop exact duplicate (query, positive) token pairs, keeping the smallest id.
    """

    task: str
    source: sources.SourceSpec
    builder: sources.ExampleBuilder
    template: templates.PromptTemplate
    tokenizer: str
    num_negatives: int = 0
    policy: QualityPolicy = QualityPolicy()
    dedupe: bool = True


def example_id(unit_index: int, record_number: int) -> int:
    if record_number >= 1 << UNIT_BITS:
        raise ValueError(f"read unit {unit_index} has more than 2**{UNIT_BITS} records; split it.")
    return (unit_index << UNIT_BITS) | record_number


def shard_of(identifier: int, num_shards: int) -> int:
    """A record's shard: a hash of its id (balanced, and the same on every runner)."""
    digest = hashlib.blake2b(int(identifier).to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def content_key(example: prepared.PreparedExample) -> bytes:
    """Duplicate key: a hash of the query and positive token ids."""
    hasher = hashlib.blake2b(digest_size=16)
    for ids in (example.query, example.positive):
        hasher.update(len(ids).to_bytes(4, "little"))
        hasher.update(np.asarray(ids, "<i4").tobytes())
    return hasher.digest()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one raw record: kept (with its encoded record), bad, or filtered."""

    split: str
    kind: str  # "kept" | "bad" | "filtered"
    example_id: int = 0
    record: bytes = b""
    key: bytes = b""
    lengths: tuple[int, ...] = ()  # query, positive, each negative
    reason: str = ""


class RecordPreparer:
    """Raw record -> Outcome: builder, policy, template, tokenizer (loaded once per worker)."""

    def __init__(self, spec: PrepareSpec):
        self.spec = spec
        self._tokenizer = None
        self._reports: dict[str, quality.QualityReport] = {}

    def _encode(self, text: str) -> np.ndarray:
        if self._tokenizer is None:
            from gemb.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(paths.local_copy(prepared.tokenizer_file(self.spec.tokenizer)))
        return np.asarray(self._tokenizer.encode(text, add_bos=False), np.int32)

    def _report(self, split: str) -> quality.QualityReport:
        if split not in self._reports:
            self._reports[split] = quality.QualityReport(self.spec.task, split, self.spec.policy)
        return self._reports[split]

    def __call__(self, split: str, identifier: int, raw: sources.RawRecord) -> Outcome:
        spec = self.spec
        try:
            if raw.error is not None:
                raise raw.error
            example = spec.builder(raw.value, spec.policy)
        except RejectRecord as error:
            # Raises under on_bad_data='fatal' (the job fails naming the record), else logs the
            # first of each reason in this worker.
            self._report(split).reject(error, raw.location, raw.value)
            return Outcome(split, "bad", identifier, reason=error.reason)
        if example is None:
            return Outcome(split, "filtered", identifier)
        template = spec.template
        k = min(len(example.negatives), spec.num_negatives)
        titles = list(example.negative_titles) + [""] * len(example.negatives)
        prepared_example = prepared.PreparedExample(
            identifier,
            self._encode(template.query(example.query)),
            self._encode(template.document(example.positive, example.positive_title)),
            tuple(self._encode(template.document(text, title))
                  for text, title in zip(example.negatives[:k], titles[:k])))
        return Outcome(split, "kept", identifier, prepared.encode_example(prepared_example),
                       content_key(prepared_example), tuple(prepared_example.lengths()))


def read_unit(unit_index: int, unit: sources.ReadUnit) -> Iterator[tuple[str, int, sources.RawRecord]]:
    for number, raw in enumerate(unit()):
        yield unit.split, example_id(unit_index, number), raw


def numbered_units(spec: PrepareSpec) -> list[tuple[int, sources.ReadUnit]]:
    """Every split's read units, numbered once for the whole task (ids are unique across splits)."""
    units = [unit for split in spec.source.split_names for unit in spec.source.units(split)]
    return list(enumerate(units))


# --------------------------------------------------------------------- statistics -> info.json


_BUCKETS = len(prepared.LENGTH_BUCKETS) + 1


def empty_statistics() -> dict[str, Any]:
    """A split's counts: records seen, filtered, bad per reason, token-length buckets per role."""
    return {"records_seen": 0, "filtered": 0, "bad_records": {},
            "lengths": {role: [0] * _BUCKETS for role in ROLES}}


def _bucket(length: int) -> int:
    return int(np.searchsorted(prepared.LENGTH_BUCKETS, length, side="left"))


def add_outcome(statistics: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    statistics["records_seen"] += 1
    if outcome.kind == "bad":
        statistics["bad_records"][outcome.reason] = statistics["bad_records"].get(outcome.reason, 0) + 1
    elif outcome.kind == "filtered":
        statistics["filtered"] += 1
    else:
        lengths = statistics["lengths"]
        lengths["query"][_bucket(outcome.lengths[0])] += 1
        lengths["positive"][_bucket(outcome.lengths[1])] += 1
        for length in outcome.lengths[2:]:
            lengths["negatives"][_bucket(length)] += 1
    return statistics


def merge_statistics(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out = empty_statistics()
    for part in parts:
        out["records_seen"] += part["records_seen"]
        out["filtered"] += part["filtered"]
        for reason, count in part["bad_records"].items():
            out["bad_records"][reason] = out["bad_records"].get(reason, 0) + count
        for role in ROLES:
            out["lengths"][role] = [a + b for a, b in zip(out["lengths"][role], part["lengths"][role])]
    return out


def _histogram(buckets: Sequence[int]) -> list[list]:
    """[[upper bound, count], ...] of the non-empty buckets (the last bound, None, is "more")."""
    bounds = list(prepared.LENGTH_BUCKETS) + [None]
    return [[bound, int(count)] for bound, count in zip(bounds, buckets) if count]


def build_info(spec: PrepareSpec, statistics: Mapping[str, Mapping[str, Any]],
               shard_sizes: Mapping[str, Sequence[int]]) -> prepared.PreparedInfo:
    splits = {}
    for split in spec.source.split_names:
        stats = statistics.get(split) or empty_statistics()
        sizes = [int(n) for n in shard_sizes[split]]
        bad = {reason: stats["bad_records"][reason] for reason in quality.REASONS
               if stats["bad_records"].get(reason)}
        kept = stats["records_seen"] - stats["filtered"] - sum(bad.values())
        splits[split] = prepared.SplitInfo(
            num_examples=sum(sizes), shard_sizes=sizes, records_seen=stats["records_seen"],
            filtered=stats["filtered"], duplicates_dropped=kept - sum(sizes), bad_records=bad,
            token_lengths={role: _histogram(stats["lengths"][role]) for role in ROLES})
        if sum(sizes) == 0:
            raise ValueError(f"task {spec.task!r} split {split!r} kept no examples "
                             f"({stats['records_seen']} records seen, bad: "
                             f"{stats['bad_records'] or 'none'}); check the paths and fields.")
    return prepared.PreparedInfo(
        task=spec.task, num_negatives=spec.num_negatives, splits=splits,
        template=dataclasses.asdict(spec.template),
        vocabulary=prepared.vocabulary_fingerprint(spec.tokenizer), dedupe=spec.dedupe)


def _deduplicated(kept: Iterable[Outcome]) -> list[Outcome]:
    best: dict[bytes, Outcome] = {}
    for outcome in kept:
        current = best.get(outcome.key)
        if current is None or outcome.example_id < current.example_id:
            best[outcome.key] = outcome
    return list(best.values())


# --------------------------------------------------------------------------- in-process reference


def prepare_in_process(spec: PrepareSpec, output: paths.PathLike, num_shards: int) -> prepared.PreparedInfo:
    """The pipeline's steps in one process, without Beam: the same files, byte for byte."""
    preparer = RecordPreparer(spec)
    outcomes: dict[str, list[Outcome]] = {split: [] for split in spec.source.split_names}
    for unit_index, unit in numbered_units(spec):
        for split, identifier, raw in read_unit(unit_index, unit):
            outcomes[split].append(preparer(split, identifier, raw))
    statistics, shards = {}, {}
    for split, results in outcomes.items():
        statistics[split] = empty_statistics()
        for outcome in results:
            add_outcome(statistics[split], outcome)
        kept = [o for o in results if o.kind == "kept"]
        if spec.dedupe:
            kept = _deduplicated(kept)
        shards[split] = [[] for _ in range(num_shards)]
        for outcome in sorted(kept, key=lambda o: o.example_id):
            shards[split][shard_of(outcome.example_id, num_shards)].append(outcome)
    info = build_info(spec, statistics, {split: [len(s) for s in split_shards]
                                         for split, split_shards in shards.items()})
    for split, split_shards in shards.items():
        for index, shard in enumerate(split_shards):
            prepared.write_shard(paths.as_path(output) / prepared.shard_name(split, index, num_shards),
                                 [o.record for o in shard])
    prepared.write_info(output, info)
    return info


# --------------------------------------------------------------------------- the Beam pipeline


def build_pipeline(pipeline, spec: PrepareSpec, output: str, num_shards: int) -> None:
    """Adds the prepare job for `spec` to a Beam pipeline (runner chosen by its options)."""
    import apache_beam as beam

    class Prepare(beam.DoFn):
        def setup(self):
            self.preparer = RecordPreparer(spec)

        def process(self, element):
            split, identifier, raw = element
            yield self.preparer(split, identifier, raw)

    def write_shard(element):
        (split, index), outcomes = element
        ordered = sorted(outcomes, key=lambda o: o.example_id)
        prepared.write_shard(paths.as_path(output) / prepared.shard_name(split, index, num_shards),
                             [o.record for o in ordered])
        return split, index, len(ordered)

    class Statistics(beam.CombineFn):
        def create_accumulator(self):
            return empty_statistics()

        def add_input(self, accumulator, outcome):
            return add_outcome(accumulator, outcome)

        def merge_accumulators(self, accumulators):
            return merge_statistics(accumulators)

        def extract_output(self, accumulator):
            return accumulator

    def write_info(_, statistics, written):
        per_split = {split: merge_statistics([s for k, s in statistics if k == split])
                     for split in spec.source.split_names}
        sizes = {split: [0] * num_shards for split in spec.source.split_names}
        for split, index, count in written:
            sizes[split][index] = count
        info = build_info(spec, per_split, sizes)  # refuses a split with no example
        # Shards no record hashed to are written empty, so every shard file exists.
        done = {(split, index) for split, index, _ in written}
        for split in spec.source.split_names:
            for index in range(num_shards):
                if (split, index) not in done:
                    prepared.write_shard(paths.as_path(output) /
                                         prepared.shard_name(split, index, num_shards), [])
        prepared.write_info(output, info)

    outcomes = (pipeline
                | "Units" >> beam.Create(numbered_units(spec))
                | "Reshuffle units" >> beam.Reshuffle()
                | "Read" >> beam.FlatMapTuple(read_unit)
                | "Prepare" >> beam.ParDo(Prepare()))
    statistics = (outcomes
                  | "By split" >> beam.Map(lambda o: (o.split, o))
                  | "Statistics" >> beam.CombinePerKey(Statistics()))
    kept = outcomes | "Kept" >> beam.Filter(lambda o: o.kind == "kept")
    if spec.dedupe:
        kept = (kept
                | "By content" >> beam.Map(lambda o: ((o.split, o.key), o))
                | "Group duplicates" >> beam.GroupByKey()
                | "Smallest id" >> beam.MapTuple(lambda _, group: min(group, key=lambda o: o.example_id)))
    written = (kept
               | "By shard" >> beam.Map(lambda o: ((o.split, shard_of(o.example_id, num_shards)), o))
               | "Group shards" >> beam.GroupByKey()
               | "Write shards" >> beam.Map(write_shard))
    (pipeline
     | "Once" >> beam.Create([None])
     | "Write info" >> beam.Map(write_info, beam.pvalue.AsList(statistics),
                                beam.pvalue.AsList(written)))


def _import_beam():
    try:
        import apache_beam
    except ImportError:
        raise SystemExit("gemb data prepare needs Apache Beam: pip install 'gemb[prepare]' (or run "
                         "it with --in_process, without Beam, for a small task).") from None
    return apache_beam


def run_pipeline(spec: PrepareSpec, output: str, num_shards: int,
                 beam_args: Sequence[str] = ()) -> prepared.PreparedInfo:
    """Runs the Beam job (DirectRunner unless `beam_args` name another runner); returns the info."""
    beam = _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    if num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
    with beam.Pipeline(runner=default_runner(beam_args),
                       options=PipelineOptions(list(beam_args))) as pipeline:
        build_pipeline(pipeline, spec, str(output), num_shards)
    return prepared.read_info(output)


def default_runner(beam_args: Sequence[str]):
    """None (Beam picks the runner named by --runner) when `beam_args` name one, else the
    DirectRunner's in-process engine, the FnApiRunner, named directly: the DirectRunner itself
    first tries to download the Prism runner from GitHub, which an offline machine cannot."""
    if any(arg.startswith("--runner") for arg in beam_args):
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


# --------------------------------------------------------------------------- the CLI


def _builtin_spec(name: str, tokenizer: str, policy: QualityPolicy, dedupe: bool) -> PrepareSpec:
    from gemb.data import tasks

    definitions = tasks.builtin_task_definitions()
    if name not in definitions:
        raise SystemExit(f"gemb data prepare: unknown task {name!r}; built-in tasks here: "
                         f"{sorted(definitions)} (or describe a source with --format/--split).")
    definition = definitions[name]
    return PrepareSpec(name, definition.source, definition.builder, definition.template(),
                       tokenizer, definition.num_negatives, policy, dedupe)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemb data prepare",
        description="Tokenise a task into sharded ArrayRecord files (Apache Beam). Arguments "
                    "after `--` are Beam pipeline options (default --runner=DirectRunner).")
    parser.add_argument("--task", help="a built-in task (gemb.data.tasks) to prepare")
    parser.add_argument("--name", help="the task name of a source described below")
    parser.add_argument("--format", choices=sources.SOURCE_FORMATS)
    parser.add_argument("--split", action="append", default=[], metavar="SPLIT=PATHS",
                        help="a split and its files / glob / folder (repeatable; comma-separated)")
    parser.add_argument("--source_option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the source's reader (repeatable), e.g. for beir: "
                             "split_name=dev (the qrels file to read) and hard_negatives_path="
                             "negatives.jsonl (`gemb data mine-negatives` output); a VALUE that "
                             "parses as JSON (a number, true) is passed as that")
    parser.add_argument("--query_field", default="query")
    parser.add_argument("--positive_field", default="positive")
    parser.add_argument("--title_field")
    parser.add_argument("--negatives_field", help="a list field of hard negatives")
    parser.add_argument("--num_negatives", type=int, default=0)
    parser.add_argument("--template", default="search",
                        help="a default template kind of gemb.data.templates")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.model / tokenizer.json, or a model folder holding one")
    parser.add_argument("--output", required=True, help="the prepared folder (local or gs://)")
    parser.add_argument("--num_shards", type=int, required=True)
    parser.add_argument("--no_dedupe", action="store_true")
    parser.add_argument("--on_bad_data", choices=quality.ON_BAD_DATA, default="skip")
    parser.add_argument("--max_chars", type=int, default=QualityPolicy().max_chars)
    parser.add_argument("--in_process", action="store_true",
                        help="run without Beam, in this process (small tasks, debugging)")
    return parser


def spec_from_args(args: argparse.Namespace) -> PrepareSpec:
    policy = QualityPolicy(on_bad_data=args.on_bad_data, max_chars=args.max_chars)
    if args.task:
        return _builtin_spec(args.task, args.tokenizer, policy, not args.no_dedupe)
    if not (args.name and args.format and args.split):
        raise SystemExit("gemb data prepare: give --task NAME, or --name, --format and --split "
                         "SPLIT=PATHS for your own source.")
    splits = {}
    for item in args.split:
        split, _, where = item.partition("=")
        if not where:
            raise SystemExit(f"gemb data prepare: --split {item!r} is not SPLIT=PATHS.")
        splits[split] = where.split(",")
    options = {}
    for item in args.source_option:
        key, _, value = item.partition("=")
        if not key or not _:
            raise SystemExit(f"gemb data prepare: --source_option {item!r} is not KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.negatives_field:
        builder = sources.TripletBuilder(args.query_field, args.positive_field, args.title_field,
                                         negatives_list_field=args.negatives_field)
    else:
        builder = sources.PairBuilder(args.query_field, args.positive_field, args.title_field)
    return PrepareSpec(args.name, sources.SourceSpec.of(args.format, splits, **options), builder,
                       templates.default_template(args.template), args.tokenizer,
                       args.num_negatives, policy, not args.no_dedupe)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    llm_stages = {"mine-negatives": "gemb.data.hard_negatives",
                  "filter-pairs": "gemb.data.llm_filter",
                  "synthesize-queries": "gemb.data.synthetic",
                  "synthesize-classification": "gemb.data.synthetic_classification",
                  "beam": "gemb.data.llm_beam"}
    if argv and argv[0] in llm_stages:
        import importlib

        return importlib.import_module(llm_stages[argv[0]]).main(argv[1:])
    if not argv or argv[0] != "prepare":
        print("usage: gemb data prepare --help | gemb data mine-negatives --help | "
              "gemb data filter-pairs --help | gemb data synthesize-queries --help | "
              "gemb data synthesize-classification --help | gemb data beam --help",
              file=sys.stderr)
        return 2
    argv = argv[1:]
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = spec_from_args(args)
    if args.in_process:
        info = prepare_in_process(spec, args.output, args.num_shards)
    else:
        info = run_pipeline(spec, args.output, args.num_shards, beam_args)
    for split, split_info in info.splits.items():
        print(f"{spec.task} {split}: {split_info.num_examples} examples in "
              f"{split_info.num_shards} shards ({split_info.records_seen} records read, "
              f"{sum(split_info.bad_records.values())} bad {split_info.bad_records or ''}, "
              f"{split_info.filtered} filtered, {split_info.duplicates_dropped} duplicates) "
              f"-> {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
