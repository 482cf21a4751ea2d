"""Synthetic classification data by multi-stage prompting, as the Gemini Embedding recipe does it:
first the LLM invents situations (entities) for each label, then it writes a text about each.

A task is `ClassificationTask(name, description, labels)`: `description` says who writes the
texts, as the prompts use it ("a bank customer"), and each label is rendered as words
("card_arrival" -> "card arrival", as gemb.data.sources.label_to_text does).

  1. list: for each label, LIST_PROMPT asks for `items_per_list` situations,

        List 20 different situations in which a bank customer would write about card arrival:
        1.

     sampled with a seed of the label's own (stopping before item 21). The reply, after the
     "1." the prompt ends with, is parsed as a numbered or bulleted list (`parse_list`; other
     lines are ignored, repeated items kept once, at most 20 items). A reply with no item is "unparseable_reply"
     (counted, the first one logged, that label gets no texts);
  2. sample from the TAIL: `samples_per_label` items drawn (seeded) from the last
     `tail_fraction` of the parsed list (`sample_tail`);
  3. write: TEXT_PROMPT asks for a text about each sampled item,

        Write a short message from a bank customer about card arrival, in this situation: <item>
        Message:

     sampled with the item's own seed, stopping at a newline. The reply's first line (stripped,
     of a "Message:" label and quotes too) is the text; an empty one is "unparseable_reply".

Outputs in one folder: lists.jsonl (stage 1, one line per label: {id (the label), label,
items, sampled (1-based positions in items), reply}), kept.jsonl {id, text, label, item} (one
per text; id "<label>/<position>"), dropped.jsonl (unparseable texts, with the raw "reply") and
summary.json. kept.jsonl is a classification source as it is:
`sources.ClassificationBuilder(text_field="text", label_field="label", labels=task.labels)`
(text -> the label's words as the positive, other labels as negatives). Both stages resume
after a crash (gemb.data.resumable): labels in lists.jsonl are not listed again, and items in
kept / dropped are not written again; seeds derive from the run's seed and the label / item id
only, so a resumed run writes what an uninterrupted one does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import random
import re
import string
from typing import Any, Optional, Sequence

from gemb.data import resumable
from gemb.data.synthetic import clean_reply, generate_each, passage_seed
from gemb.progress import Progress

log = logging.getLogger(__name__)

LIST_PROMPT = ("List {count} different situations in which {description} would write about "
               "{label}:\n1.")
TEXT_PROMPT = ("Write a short message from {description} about {label}, in this situation: "
               "{item}\nMessage:")
LISTS_NAME = "lists.jsonl"

_PROMPT_FIELDS = {"list_prompt": ({"count", "description", "label"}, {"label"}),
                  "text_prompt": ({"description", "label", "item"}, {"item"})}


def label_words(label: str) -> str:
    """'card_arrival' -> 'card arrival' (gemb.data.sources.label_to_text, without importing
    TensorFlow)."""
    return " ".join(str(label).replace("_", " ").split())


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """name: the task (recorded in the summary). description: who writes its texts, as the
    prompts say it ("a bank customer"). labels: the class labels. list_prompt / text_prompt:
    the two prompts ({count}, {description}, {label}; {description}, {label}, {item})."""

    name: str
    description: str
    labels: tuple[str, ...]
    list_prompt: str = LIST_PROMPT
    text_prompt: str = TEXT_PROMPT

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(self.labels))
        for field in ("name", "description"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"a classification task needs a non-empty {field!r}, got "
                                 f"{value!r}.")
        if not self.labels:
            raise ValueError(f"task {self.name!r} has no labels.")
        bad = [label for label in self.labels if not isinstance(label, str) or not label.strip()]
        if bad:
            raise ValueError(f"task {self.name!r}: labels must be non-empty texts, got {bad!r}.")
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            raise ValueError(f"task {self.name!r}: labels {repeated} appear more than once.")
        for field, (allowed, required) in _PROMPT_FIELDS.items():
            prompt = getattr(self, field)
            used = {name for _, name, _, _ in string.Formatter().parse(prompt) if name}
            if used - allowed or required - used:
                raise ValueError(f"task {self.name!r}: {field}={prompt!r} may use only "
                                 f"{sorted(allowed)} and must use {sorted(required)}.")

    def list_prompt_for(self, label: str, count: int) -> str:
        return self.list_prompt.format(count=count, description=self.description,
                                       label=label_words(label))

    def text_prompt_for(self, label: str, item: str) -> str:
        return self.text_prompt.format(description=self.description, label=label_words(label),
                                       item=item)

    @classmethod
    def from_json(cls, path: str) -> "ClassificationTask":
        """A task from a JSON file {"name", "description", "labels": [...], "list_prompt"?,
        "text_prompt"?} (local or gs://)."""
        from gemb import paths

        value = json.loads(paths.as_path(path).read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(value, dict) or not {"name", "description", "labels"} <= set(value) \
                or set(value) - fields or not isinstance(value["labels"], list):
            raise ValueError(f"{path}: a classification task is {{\"name\": text, "
                             f"\"description\": text, \"labels\": [text, ...]}} (optional: "
                             f"\"list_prompt\", \"text_prompt\"), got {json.dumps(value)[:300]}.")
        return cls(**value)


@dataclasses.dataclass(frozen=True)
class ClassificationSynthesisConfig:
    """items_per_list: situations asked for per label. samples_per_label: texts per label,
    about items drawn from the last `tail_fraction` of the parsed list. Sampling (both stages):
    temperature, top_p, `seed` (each label's and item's own seed derives from it);
    list_max_new_tokens / max_new_tokens: the list's and a text's length. batch_size: labels
    or items per step; concurrency: generations in flight (for a server)."""

    items_per_list: int = 20
    samples_per_label: int = 5
    tail_fraction: float = 0.5
    temperature: float = 0.9
    top_p: float = 0.95
    list_max_new_tokens: int = 640
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 16
    concurrency: int = 1

    def __post_init__(self):
        if min(self.items_per_list, self.samples_per_label, self.list_max_new_tokens,
               self.max_new_tokens, self.batch_size, self.concurrency) < 1:
            raise ValueError(f"{self}: the counts, lengths, batch_size and concurrency must be "
                             ">= 1.")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError(f"tail_fraction={self.tail_fraction} must be in (0, 1].")

    def sampling(self, seed: int, max_new_tokens: int, stop: tuple[str, ...]):
        from gemb.llm.decoder import SamplingConfig

        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=stop, seed=seed)


# ------------------------------------------------------------------- parsing and sampling

# A list item: "3.", "3)", "(3)" or a bullet ("-", "*", "+", "•") at the start of a line.
_LIST_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.)]|[-*+•])\s*(.*)$")


def parse_list(text: str) -> list[str]:
    """The items of a numbered or bulleted list, in order: lines without a list marker
    (a preamble, comments, blank lines) are ignored, an item is stripped of markdown emphasis,
    quotes and trailing punctuation, items without a letter or digit are dropped and a
    repeated item (ignoring case and spacing) is kept once."""
    items, seen = [], set()
    for line in text.splitlines():
        match = _LIST_ITEM.match(line)
        if match is None:
            continue
        item, before = match.group(1), None
        while item != before:  # '**"A late card".**' -> 'A late card'
            before, item = item, item.strip().strip("*_\"'`").rstrip(".;,")
        key = " ".join(item.lower().split())
        if not any(character.isalnum() for character in item) or key in seen:
            continue
        seen.add(key)
        items.append(item)
    return items


def sample_tail(num_items: int, samples: int, tail_fraction: float, seed: int) -> list[int]:
    """0-based positions of `samples` items drawn without replacement from the last
    ceil(tail_fraction * num_items) of a list (at least `samples` of them, or all), in order.

    The tail, not the head: asked for a list, an LLM writes the obvious, generic cases first
    and the later items are less generic, so texts about them are more diverse (the recipe's
    "sample from the tail of generated lists")."""
    tail = min(num_items, max(samples, math.ceil(tail_fraction * num_items)))
    start = num_items - tail
    return sorted(random.Random(seed).sample(range(start, num_items), min(samples, tail)))


def clean_text(reply: str) -> Optional[str]:
    """A written text: the reply's first non-blank line without a "Message:" label or quotes
    (synthetic.clean_reply); None when nothing usable is left."""
    return clean_reply(reply, label="Message")


def list_seed(run_seed: int, label: str) -> int:
    return passage_seed(run_seed, f"list\0{label}")


def tail_seed(run_seed: int, label: str) -> int:
    return passage_seed(run_seed, f"tail\0{label}")


def item_id(label: str, position: int) -> str:
    """A written text's id: its label and its item's 1-based position in the label's list."""
    return f"{label}/{position}"


# ------------------------------------------------------------------ one batch of each stage


def list_batch(llm, task: ClassificationTask, labels: Sequence[str],
               config: ClassificationSynthesisConfig, replies: resumable.KindCounter,
               pool=None) -> list[dict[str, Any]]:
    """Stage 1 for some labels: one list record per label (lists.jsonl's lines, in order)."""
    count = config.items_per_list
    stop = (f"\n{count + 1}.",)  # the list is long enough: stop before the next number
    texts = generate_each(
        llm, [task.list_prompt_for(label, count) for label in labels],
        [config.sampling(list_seed(config.seed, label), config.list_max_new_tokens, stop)
         for label in labels], pool)
    records = []
    for label, reply in zip(labels, texts):
        # The prompt ends with the first item's "1."; a list longer than asked (bullets do
        # not meet the stop string) is cut to the count asked for.
        items = parse_list("1." + reply)[:count]
        record = {"id": label, "label": label, "items": items, "sampled": [], "reply": reply}
        if not items:
            replies.count("unparseable_reply", f"the list for label {label!r}: no list item "
                                               f"in the reply {reply[:200]!r}")
            record["reason"] = "unparseable_reply"
        else:
            record["sampled"] = [position + 1 for position in sample_tail(
                len(items), config.samples_per_label, config.tail_fraction,
                tail_seed(config.seed, label))]
        records.append(record)
    return records


def text_batch(llm, task: ClassificationTask, items: Sequence[tuple[str, str, str]],
               config: ClassificationSynthesisConfig, replies: resumable.KindCounter,
               pool=None) -> list[tuple[dict[str, Any], Optional[str]]]:
    """Stage 3 for some (id, label, item): (record, None) to keep, or (record, reason) to drop,
    in order."""
    texts = generate_each(
        llm, [task.text_prompt_for(label, item) for _, label, item in items],
        [config.sampling(passage_seed(config.seed, identifier), config.max_new_tokens, ("\n",))
         for identifier, _, _ in items], pool)
    out = []
    for (identifier, label, item), reply in zip(items, texts):
        text = clean_text(reply)
        if text is None:
            replies.count("unparseable_reply", f"the text for {identifier!r}: the reply "
                                               f"{reply!r} holds no text")
            out.append(({"id": identifier, "label": label, "item": item, "reply": reply},
                        "unparseable_reply"))
        else:
            out.append(({"id": identifier, "text": text, "label": label, "item": item}, None))
    return out


def sampled_items(lists: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(id, label, item) of every sampled item of some list records, in order."""
    return [(item_id(record["label"], position), record["label"],
             record["items"][position - 1])
            for record in lists for position in record["sampled"]]


def _batches(values: Sequence, size: int):
    for start in range(0, len(values), size):
        yield values[start:start + size]


# ----------------------------------------------------------------------------- the stage


def synthesize_classification(task: ClassificationTask, llm, out_dir: str,
                              config: ClassificationSynthesisConfig =
                              ClassificationSynthesisConfig()) -> dict:
    """Runs the stage (module docstring); returns the summary it also writes. llm: anything
    with generate (gemb.llm.interface.LLM)."""
    from pathlib import Path

    lists_path = Path(out_dir) / LISTS_NAME
    lists = {}
    for record in resumable.read_records(lists_path):
        if record.get("label") in task.labels:
            lists[record["label"]] = record
    counts = {"lists_already_done": len(lists), "lists_generated": 0, "already_done": 0,
              "texts_generated": 0}

    with contextlib.ExitStack() as stack:
        pool = (stack.enter_context(concurrent.futures.ThreadPoolExecutor(config.concurrency))
                if config.concurrency > 1 else None)
        output = stack.enter_context(resumable.KeptAndDropped(out_dir))
        replies = resumable.KindCounter(log, "bad LLM reply")
        replies.counts.update({"unparseable_reply": sum(
            1 for r in lists.values() if r.get("reason") == "unparseable_reply")
            + output.dropped_by_reason.get("unparseable_reply", 0)})

        todo = [label for label in task.labels if label not in lists]
        with resumable.AppendWriter(lists_path) as writer, Progress(
                len(todo), "listing situations", unit="label") as progress:
            for batch in _batches(todo, config.batch_size):
                for record in list_batch(llm, task, batch, config, replies, pool):
                    writer.write(record)
                    lists[record["label"]] = record
                counts["lists_generated"] += len(batch)
                progress.update(len(batch))

        items = sampled_items([lists[label] for label in task.labels])
        todo = [item for item in items if item[0] not in output.done]
        counts["already_done"] = len(items) - len(todo)
        with Progress(len(todo), "writing texts", unit="text") as progress:
            for batch in _batches(todo, config.batch_size):
                for record, reason in text_batch(llm, task, batch, config, replies, pool):
                    if reason is None:
                        output.keep(record)
                    else:
                        output.drop(record, reason)
                counts["texts_generated"] += len(batch)
                progress.update(len(batch))

    done_lists = [lists[label] for label in task.labels]
    summary = {"stage": "synthesize-classification",
               "task": {**dataclasses.asdict(task), "labels": list(task.labels)},
               "config": dataclasses.asdict(config), "labels": len(task.labels), **counts,
               "lists_unparseable": sum(1 for r in done_lists
                                        if r.get("reason") == "unparseable_reply"),
               "items_listed": sum(len(r["items"]) for r in done_lists),
               "items_sampled": len(items), **output.totals(),
               "bad_replies": replies.as_dict()}
    output.write_summary(summary)
    return summary


def build_parser():
    """The stage's flags (also `gemb data beam synthesize-classification`'s)."""
    import argparse

    from gemb.llm.interface import add_llm_argument

    defaults = ClassificationSynthesisConfig
    parser = argparse.ArgumentParser(
        prog="gemb data synthesize-classification",
        description="Synthetic classification data in two LLM stages: list situations for "
                    "each label, then write a text about items sampled from the tail of each "
                    "list: DIR/kept.jsonl {id, text, label, item} (a classification source: "
                    "ClassificationBuilder(text_field='text', label_field='label')), "
                    "DIR/lists.jsonl, DIR/dropped.jsonl, DIR/summary.json. Resumable: rerun "
                    "the same command after a crash.")
    parser.add_argument("--task", help='JSON file {"name", "description", "labels": [...], '
                                       '"list_prompt"?, "text_prompt"?} (local or gs://)')
    parser.add_argument("--name", help="the task's name (without --task)")
    parser.add_argument("--description", help='who writes the texts, as the prompts say it: '
                                              '"a bank customer" (without --task)')
    parser.add_argument("--labels", help="comma-separated labels (without --task)")
    add_llm_argument(parser)
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--items_per_list", type=int, default=defaults.items_per_list)
    parser.add_argument("--samples_per_label", type=int, default=defaults.samples_per_label)
    parser.add_argument("--tail_fraction", type=float, default=defaults.tail_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--list_max_new_tokens", type=int,
                        default=defaults.list_max_new_tokens)
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency,
                        help="generate requests in flight (for a server --llm)")
    return parser


def task_and_config_from_args(args) -> tuple[ClassificationTask, ClassificationSynthesisConfig]:
    """The task (--task, or --name/--description/--labels) and the config; ValueError (or
    OSError) naming what is wrong."""
    flags = (args.name, args.description, args.labels)
    if args.task:
        if any(flags):
            raise ValueError("give --task FILE or --name/--description/--labels, not both.")
        task = ClassificationTask.from_json(args.task)
    elif all(flags):
        task = ClassificationTask(args.name, args.description, tuple(
            label.strip() for label in args.labels.split(",") if label.strip()))
    else:
        raise ValueError("give --task FILE, or all of --name, --description and --labels.")
    config = ClassificationSynthesisConfig(
        items_per_list=args.items_per_list, samples_per_label=args.samples_per_label,
        tail_fraction=args.tail_fraction, temperature=args.temperature, top_p=args.top_p,
        list_max_new_tokens=args.list_max_new_tokens, max_new_tokens=args.max_new_tokens,
        seed=args.seed, batch_size=args.batch_size, concurrency=args.concurrency)
    return task, config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        task, config = task_and_config_from_args(args)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    from gemb.llm.interface import llm_from_args

    summary = synthesize_classification(task, llm_from_args(args), args.out, config)
    print(json.dumps(summary), flush=True)
    return 0
