"""`gemb data synthesize-classification` (gemb.data.synthetic_classification) with a
deterministic stand-in LLM: list parsing (numbered, bulleted, junk), tail sampling, the two
stages' records and counts, an unparseable reply counted every time and logged once, a crash
(in either stage, plus a torn line) and a rerun equal to one uninterrupted run, kept.jsonl read
by sources.ClassificationBuilder; and the command end to end with the real in-process decoder
on a TINY folder (files, counts, two runs byte-identical)."""

import json
import logging
import re

import pytest

from gemb.data import prepare, resumable
from gemb.data import synthetic_classification as sc
from gemb.data.synthetic import passage_seed

LABELS = ("card_arrival", "lost_card", "junk_a", "junk_b", "quiet")
TASK = sc.ClassificationTask("banking", "a bank customer", LABELS)
CONFIG = sc.ClassificationSynthesisConfig(items_per_list=8, samples_per_label=3,
                                          tail_fraction=0.5, batch_size=2)
JUNK = {"junk_a": "", "junk_b": "\n\nSorry, I cannot list that."}


class ListWriterLLM:
    """A deterministic stand-in LLM for the two stages (the real decoder is tested below and
    in tests/llm).

    A list prompt ("List N ... about WORDS:\\n1.") gets N + 2 numbered items "WORDS situation
    k" (cut at the sampling's stop strings, as a real backend does), bulleted for lost_card,
    all "mute ..." for quiet, JUNK[label] for the junk labels. A text prompt ("...: ITEM
    \\nMessage:") gets " a note on ITEM seed S\\nmore", or "" for a "mute" item. Records
    (prompt, seed) per call; fails after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after, self.seen = 0, fail_after, []

    def log_likelihood(self, prompts, continuations):  # an LLM (make_llm takes it); unused
        raise AssertionError("the classification stage only generates")

    def generate(self, prompts, sampling):
        assert len(prompts) == 1  # one call per item: each with its own seed
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        prompt = prompts[0]
        self.seen.append((prompt, sampling.seed))
        listing = re.fullmatch(r"List (\d+) different situations in which a bank customer "
                               r"would write about (.+):\n1\.", prompt)
        if listing:
            count, words = int(listing.group(1)), listing.group(2)
            assert sampling.stop == (f"\n{count + 1}.",)
            label = words.replace(" ", "_")
            if label in JUNK:
                return [JUNK[label]]
            lines = [f"{'mute' if label == 'quiet' else words} situation {k}"
                     for k in range(1, count + 3)]
            if label == "lost_card":
                text = " " + lines[0] + "".join(f"\n- {line}" for line in lines[1:])
            else:
                text = " " + lines[0] + "".join(f"\n{k}. {line}"
                                                for k, line in enumerate(lines[1:], 2))
            cuts = [text.index(s) for s in sampling.stop if s in text]
            return [text[:min(cuts)] if cuts else text]
        item = re.fullmatch(r"Write a short message from a bank customer about .+, in this "
                            r"situation: (.+)\nMessage:", prompt, re.S).group(1)
        assert sampling.stop == ("\n",)
        return ["" if "mute" in item else f" a note on {item} seed {sampling.seed}"]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -------------------------------------------------------------------- parsing and sampling


def test_parse_list_numbered_bulleted_and_junk():
    assert sc.parse_list("1. first\n2) second\n(3) third\n10. tenth") == [
        "first", "second", "third", "tenth"]
    assert sc.parse_list("- one\n* two\n+ three\n\u2022 four") == ["one", "two", "three", "four"]
    # Preamble, comments, blank lines and wrapped text are not items; emphasis, quotes and
    # trailing punctuation go; a repeat (case, spacing) is kept once; marker-only lines drop.
    assert sc.parse_list("Sure! Here is the list:\n\n1. **Lost card.**\n   (continued)\n"
                         "2. \"A late transfer\";\n3. lost  CARD\n4.\n5. ???\nThat's all.") == [
        "Lost card", "A late transfer"]
    for junk in ("", "\n\n", "Sorry, I cannot list that.", "1.\n2. ?!", "no list here\nat all"):
        assert sc.parse_list(junk) == []


def test_sample_tail_draws_from_the_end_of_the_list():
    picks = [sc.sample_tail(20, 5, 0.5, seed) for seed in range(50)]
    for picked in picks:
        assert len(picked) == 5 and picked == sorted(set(picked))
        assert all(10 <= p < 20 for p in picked)  # the last half
    assert len({tuple(p) for p in picks}) > 10  # seeds differ
    assert sc.sample_tail(20, 5, 0.5, 3) == sc.sample_tail(20, 5, 0.5, 3)  # deterministic
    # The tail holds at least `samples` items; a short list gives all it has.
    assert all(p >= 4 for p in sc.sample_tail(8, 4, 0.25, 0))
    assert sc.sample_tail(3, 5, 0.5, 0) == [0, 1, 2]
    assert sc.sample_tail(1, 5, 0.1, 0) == [0]
    assert {p for s in range(30) for p in sc.sample_tail(10, 2, 1.0, s)} == set(range(10))


def test_task_checks_and_prompts(tmp_path):
    from gemb.data import sources

    assert sc.label_words("card__arrival_ x") == sources.label_to_text("card__arrival_ x")
    assert TASK.list_prompt_for("card_arrival", 20) == (
        "List 20 different situations in which a bank customer would write about card "
        "arrival:\n1.")
    assert TASK.text_prompt_for("card_arrival", "the card came bent") == (
        "Write a short message from a bank customer about card arrival, in this situation: "
        "the card came bent\nMessage:")
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "banking", "description": "a bank customer",
                                "labels": list(LABELS)}))
    assert sc.ClassificationTask.from_json(str(path)) == TASK
    for bad, match in [(dict(labels=()), "no labels"), (dict(labels=("a", "a")), "more than once"),
                       (dict(labels=("a", " ")), "non-empty texts"),
                       (dict(description=""), "non-empty 'description'"),
                       (dict(text_prompt="Write about {label}"), "must use \\['item'\\]"),
                       (dict(list_prompt="{label} {oops}"), "may use only")]:
        with pytest.raises(ValueError, match=match):
            sc.ClassificationTask(**{"name": "t", "description": "d", "labels": ("a",), **bad})
    path.write_text(json.dumps({"name": "t", "labels": ["a"]}))
    with pytest.raises(ValueError, match="a classification task is"):
        sc.ClassificationTask.from_json(str(path))


# ---------------------------------------------------------------------------- the stage


def test_stage_lists_samples_the_tail_and_writes_texts(tmp_path, caplog):
    llm = ListWriterLLM()
    with caplog.at_level(logging.WARNING):
        summary = sc.synthesize_classification(TASK, llm, str(tmp_path / "out"), CONFIG)
    lists = _read(tmp_path / "out" / "lists.jsonl")
    assert [r["id"] for r in lists] == list(LABELS)
    by_label = {r["label"]: r for r in lists}
    # The stop string cut the reply after 8 items; bulleted lists parse the same.
    for label in ("card_arrival", "lost_card"):
        words = sc.label_words(label)
        assert by_label[label]["items"] == [f"{words} situation {k}" for k in range(1, 9)]
        sampled = by_label[label]["sampled"]
        assert sampled == [p + 1 for p in sc.sample_tail(8, 3, 0.5, sc.tail_seed(0, label))]
        assert len(sampled) == 3 and all(5 <= p <= 8 for p in sampled)  # the tail
    for label in JUNK:
        assert by_label[label]["items"] == [] and by_label[label]["sampled"] == []
        assert by_label[label]["reason"] == "unparseable_reply"
        assert by_label[label]["reply"] == JUNK[label]
    # Seeds: the list's from the label, each text's from its id.
    assert [seed for prompt, seed in llm.seen[:5]] == [sc.list_seed(0, l) for l in LABELS]
    kept = _read(tmp_path / "out" / "kept.jsonl")
    dropped = _read(tmp_path / "out" / "dropped.jsonl")
    want = []
    for label in ("card_arrival", "lost_card"):
        for position in by_label[label]["sampled"]:
            identifier = f"{label}/{position}"
            item = f"{sc.label_words(label)} situation {position}"
            want.append({"id": identifier, "text": f"a note on {item} seed "
                                                   f"{passage_seed(0, identifier)}",
                         "label": label, "item": item})
    assert kept == want
    assert [(r["id"], r["reason"], r["reply"]) for r in dropped] == [
        (f"quiet/{p}", "unparseable_reply", "") for p in by_label["quiet"]["sampled"]]
    assert summary["labels"] == 5 and summary["lists_generated"] == 5
    assert summary["lists_unparseable"] == 2 and summary["items_listed"] == 24
    assert summary["items_sampled"] == 9 and summary["texts_generated"] == 9
    assert summary["kept"] == 6 and summary["dropped"] == 3
    assert summary["dropped_by_reason"] == {"unparseable_reply": 3}
    assert summary["bad_replies"] == {"unparseable_reply": 5}  # 2 lists + 3 texts
    assert llm.calls == 5 + 9
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    messages = [r.getMessage() for r in caplog.records if r.name == sc.log.name]
    assert len([m for m in messages if "(unparseable_reply)" in m]) == 1, messages

    # kept.jsonl is a classification source: text -> the label's words, others as negatives.
    from gemb.data import sources
    from gemb.data.quality import QualityPolicy

    builder = sources.ClassificationBuilder(text_field="text", label_field="label",
                                            labels=LABELS, num_label_negatives=1)
    examples = [builder(r.value, QualityPolicy())
                for r in sources.read_jsonl(str(tmp_path / "out" / "kept.jsonl"))]
    assert [(e.query, e.positive) for e in examples] == [
        (r["text"], sources.label_to_text(r["label"])) for r in kept]
    assert all(len(e.negatives) == 1 and e.negatives[0] != e.positive for e in examples)


def test_stage_resumes_after_a_crash_in_either_stage(tmp_path):
    # Uninterrupted, 3 generations in flight (as for a server): the same records.
    whole = sc.synthesize_classification(
        TASK, ListWriterLLM(), str(tmp_path / "whole"),
        sc.ClassificationSynthesisConfig(items_per_list=8, samples_per_label=3, batch_size=2,
                                         concurrency=3))
    out = tmp_path / "resumed"
    # Stage 1 crashes in its second batch: one batch (2 labels) of lists is written.
    with pytest.raises(RuntimeError, match="simulated crash"):
        sc.synthesize_classification(TASK, ListWriterLLM(fail_after=3), str(out), CONFIG)
    assert [r["id"] for r in _read(out / "lists.jsonl")] == list(LABELS[:2])
    with (out / "lists.jsonl").open("a") as f:
        f.write('{"id": "junk_a", "label": "ju')  # torn by the crash
    # Stage 1's last 3 labels, then stage 2 crashes in its second batch of texts.
    llm = ListWriterLLM(fail_after=3 + 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sc.synthesize_classification(TASK, llm, str(out), CONFIG)
    assert len(_read(out / "lists.jsonl")) == 5 and len(_read(out / "kept.jsonl")) == 2
    llm = ListWriterLLM()
    summary = sc.synthesize_classification(TASK, llm, str(out), CONFIG)
    assert llm.calls == 7 and summary["texts_generated"] == 7
    assert summary["lists_already_done"] == 5 and summary["already_done"] == 2
    for name in ("lists.jsonl", "kept.jsonl", "dropped.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    for key in ("lists_unparseable", "items_listed", "items_sampled", "kept", "dropped",
                "dropped_by_reason", "bad_replies"):
        assert summary[key] == whole[key], key
    # Everything done: no LLM call at all.
    again = sc.synthesize_classification(TASK, ListWriterLLM(fail_after=0), str(out), CONFIG)
    assert again["lists_generated"] == again["texts_generated"] == 0 and again["kept"] == 6
    assert resumable.done_ids(out / "kept.jsonl") == {r["id"] for r in
                                                       _read(tmp_path / "whole" / "kept.jsonl")}


# ------------------------------------------------------------------- the real decoder, TINY


def test_cli_with_the_real_decoder(tmp_path_factory, tmp_path, capsys):
    from tiny_checkpoints import write_tiny_llm_folder

    model_folder = write_tiny_llm_folder(tmp_path_factory, ["Message", "List", "situations"])
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"name": "banking", "description": "a bank customer",
                                     "labels": ["card_arrival", "lost_card"]}))
    common = ["--llm", str(model_folder), "--items_per_list", "4", "--samples_per_label", "2",
              "--list_max_new_tokens", "12", "--max_new_tokens", "8"]
    outputs = []
    for run, task_args in (("one", ["--task", str(task_file)]),
                           ("two", ["--name", "banking", "--description", "a bank customer",
                                    "--labels", "card_arrival,lost_card"])):
        assert prepare.main(["synthesize-classification", *task_args, "--out",
                             str(tmp_path / run), *common]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert json.loads((tmp_path / run / "summary.json").read_text()) == printed
        outputs.append(({name: (tmp_path / run / name).read_text()
                         for name in ("lists.jsonl", "kept.jsonl", "dropped.jsonl")}, printed))
    (files, summary), (files_again, summary_again) = outputs
    assert files == files_again  # seeds per label and item: the same lists and texts
    lists = [json.loads(line) for line in files["lists.jsonl"].splitlines()]
    assert [r["label"] for r in lists] == ["card_arrival", "lost_card"]
    texts = [json.loads(line) for name in ("kept.jsonl", "dropped.jsonl")
             for line in files[name].splitlines()]
    assert summary["lists_generated"] == 2 and summary["texts_generated"] == len(texts)
    assert summary["items_sampled"] == sum(len(r["sampled"]) for r in lists) == len(texts)
    assert summary["kept"] + summary["dropped"] == len(texts)
    assert all(r["text"].strip() for r in texts if "text" in r)
    for key in ("lists_unparseable", "items_listed", "kept", "dropped", "bad_replies"):
        assert summary[key] == summary_again[key]
    with pytest.raises(SystemExit):
        prepare.main(["synthesize-classification", "--name", "x", "--out", str(tmp_path / "x"),
                      *common])
