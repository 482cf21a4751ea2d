"""The LLM data stages' bookkeeping (gemb.data.llm_filter, gemb.data.synthetic, the shared
gemb.data.resumable) with a deterministic stand-in LLM: the threshold against hand-computed
expected grades, dropped records kept with their scores, bad inputs counted and logged once per
kind, crash + rerun == one uninterrupted run, kept.jsonl read by gemb.data.sources; and
`gemb data synthesize-queries` end to end with the real in-process decoder on a TINY folder."""

import json
import logging
import math
import re

import numpy as np
import pytest

from gemb.data import hard_negatives, llm_filter, prepare, resumable, synthetic

# Expected grade sum_g g * p(g) with p(g) proportional to exp(-|g - t|) (RuleLLM's grades),
# by hand: t=0: (e^-1 + 2e^-2 + 3e^-3) / (1 + e^-1 + e^-2 + e^-3); t=3 mirrors t=0 (3 - E);
# t=1: (1 + 2e^-1 + 3e^-2) / (e^-1 + 1 + e^-1 + e^-2); t=2 mirrors t=1.
EXPECTED_GRADE = {0: 0.507347, 1: 1.144659, 2: 1.855341, 3: 2.492653}


def test_expected_grades_by_hand():
    for t, want in EXPECTED_GRADE.items():
        weights = [math.exp(-abs(g - t)) for g in range(4)]
        assert sum(g * w for g, w in enumerate(weights)) / sum(weights) == pytest.approx(
            want, abs=1e-6)


def _last_line(prompt, label):
    lines = [line for line in prompt.split("\n") if line.startswith(label)]
    return lines[-1][len(label):] if lines else ""


class RuleLLM:
    """A deterministic stand-in LLM (the stages' bookkeeping is under test; the real decoder is
    tested in tests/llm).

    log_likelihood of a grade " g" after a prompt: -|g - t|, t = min(3, the number of words of
    the prompt's last "Query: " line that are in its last "Passage: " line); of anything else,
    word overlap minus length. generate: the text after "=>" in the prompt's last "Passage: "
    line, with SEED replaced by the sampling seed. Fails after `fail_after` calls of either."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after, self.seeds = 0, fail_after, []

    def _call(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")

    def log_likelihood(self, prompts, continuations):
        self._call()
        out = []
        for prompt, continuation in zip(prompts, continuations):
            if re.fullmatch(r" [0-3]", continuation):
                query = set(_last_line(prompt, "Query: ").split())
                passage = set(_last_line(prompt, "Passage: ").split())
                out.append(-abs(int(continuation) - min(3, len(query & passage))))
            else:
                words = continuation.split()
                out.append(len(set(prompt.split()) & set(words)) - len(words))
        return np.array(out, np.float64)

    def generate(self, prompts, sampling):
        self._call()
        assert sampling.stop == ("\n",) and sampling.temperature == 0.7
        self.seeds.append(sampling.seed)
        replies = []
        for prompt in prompts:
            passage = _last_line(prompt, "Passage: ")
            replies.append(" " + passage.split("=>", 1)[1].strip().replace(
                "SEED", str(sampling.seed)) if "=>" in passage else "")
        return replies


def _write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def _read(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ filter

PAIRS = [
    {"id": "a", "query": "boil eggs water", "positive": "boil the eggs in water"},      # t=3
    {"id": "b", "query": "boil eggs quickly", "positive": "boil the eggs"},            # t=2
    {"query": "capital of france", "positive": "paris is big"},                        # t=0
    {"id": 7, "query": "python sort dict", "positive": "a dict maps keys"},            # t=1
    {"id": "n", "query": "eiffel tower height", "positive": "the eiffel tower is tall",
     "negatives": ["the louvre museum"]},                                              # t=2
    {"id": "long", "query": "long text words",
     "positive": "long text words " + "x " * 100},                           # t=3, over-long
    {"id": "m1", "query": "no positive"},                                    # missing_field
    "{not json",                                                             # unparseable
    {"id": "e", "query": "   ", "positive": "p"},                            # empty_text
    {"id": "m2", "positive": "no query"},                                    # missing_field
    {"id": "w", "query": 5, "positive": "p"},                                # wrong_type
    {"id": "a", "query": "boil eggs water", "positive": "again"},            # duplicate_id
    {"id": "t", "query": "sort words", "positive": "sort these words", "negatives": "x"},
    {"id": "z", "query": "zebra stripes", "positive": "zebra stripes are black"},      # t=2
]
FILTER_CONFIG = llm_filter.FilterConfig(max_chars=60, batch_size=2)


def test_filter_keeps_pairs_at_or_above_the_threshold(tmp_path, caplog):
    source = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:7] + [""] + PAIRS[7:])
    with caplog.at_level(logging.WARNING):
        summary = llm_filter.filter_pairs(str(source), RuleLLM(), str(tmp_path / "out"),
                                          FILTER_CONFIG)
    kept = _read(tmp_path / "out" / "kept.jsonl")
    dropped = _read(tmp_path / "out" / "dropped.jsonl")
    grades = {r["id"]: r["relevance"] for r in kept + dropped}
    want = {"a": 3, "b": 2, "line:3": 0, 7: 1, "n": 2, "long": 3, "z": 2}
    assert grades == pytest.approx({i: EXPECTED_GRADE[t] for i, t in want.items()}, abs=1e-6)
    assert [r["id"] for r in kept] == ["a", "b", "n", "long", "z"]
    assert [r["id"] for r in dropped] == ["line:3", 7]
    # The input fields stay; dropped ones carry their grade and why.
    assert kept[2] == {"id": "n", "query": "eiffel tower height",
                       "positive": "the eiffel tower is tall",
                       "negatives": ["the louvre museum"], "relevance": grades["n"]}
    assert kept[3]["positive"] == PAIRS[5]["positive"]  # cut for the LLM only
    assert dropped[0] == {"id": "line:3", "query": "capital of france",
                          "positive": "paris is big", "relevance": grades["line:3"],
                          "reason": "below_threshold"}
    assert summary["read"] == 14 and summary["scored"] == 7
    assert summary["kept"] == 5 and summary["dropped"] == 2
    assert summary["drop_rate"] == pytest.approx(2 / 7, abs=1e-6)
    assert summary["bad_records"] == {"duplicate_id": 1, "empty_text": 1, "missing_field": 2,
                                      "over_long_text": 1, "unparseable_record": 1,
                                      "wrong_type": 2}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    # Logged once per kind, each naming the place.
    messages = [r.getMessage() for r in caplog.records if r.name == llm_filter.log.name]
    for kind, count in summary["bad_records"].items():
        logged = [m for m in messages if f"({kind})" in m]
        assert len(logged) == 1, (kind, messages)
    assert "pairs.jsonl:9" in next(m for m in messages if "(unparseable_record)" in m)

    # A stricter threshold drops the grade-2 pairs too (1.855 < 2.0 <= 2.49).
    strict = llm_filter.filter_pairs(
        str(source), RuleLLM(), str(tmp_path / "strict"),
        llm_filter.FilterConfig(threshold=2.0, max_chars=60, batch_size=2))
    assert [r["id"] for r in _read(tmp_path / "strict" / "kept.jsonl")] == ["a", "long"]
    assert strict["dropped"] == 5


def test_filter_resumes_after_a_crash_with_the_same_output(tmp_path):
    source = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    whole = llm_filter.filter_pairs(str(source), RuleLLM(), str(tmp_path / "whole"),
                                    FILTER_CONFIG)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        llm_filter.filter_pairs(str(source), RuleLLM(fail_after=2), str(out), FILTER_CONFIG)
    done = _read(out / "kept.jsonl") + _read(out / "dropped.jsonl")
    assert len(done) == 4  # two batches of two
    # A crash mid-write leaves a torn line: ignored, cut off and rewritten.
    before = resumable.done_ids(out / "kept.jsonl")
    with (out / "kept.jsonl").open("a") as f:
        f.write('{"id": "z", "query": "zebr')
    assert resumable.done_ids(out / "kept.jsonl") == before == {"a", "b"}
    llm = RuleLLM()
    summary = llm_filter.filter_pairs(str(source), llm, str(out), FILTER_CONFIG)
    assert summary["already_done"] == 4 and summary["scored"] == 3 and llm.calls == 2
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()
    for key in ("read", "kept", "dropped", "drop_rate", "dropped_by_reason", "bad_records"):
        assert summary[key] == whole[key], key
    # A third run finds everything done and calls the LLM never.
    llm = RuleLLM(fail_after=0)
    again = llm_filter.filter_pairs(str(source), llm, str(out), FILTER_CONFIG)
    assert again["already_done"] == 7 and again["scored"] == 0 and again["kept"] == 5


def test_kept_pairs_are_a_jsonl_source(tmp_path):
    from gemb.data import sources
    from gemb.data.quality import QualityPolicy

    source = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    llm_filter.filter_pairs(str(source), RuleLLM(), str(tmp_path / "out"), FILTER_CONFIG)
    raw = list(sources.read_jsonl(str(tmp_path / "out" / "kept.jsonl")))
    assert all(r.error is None for r in raw)
    examples = [sources.PairBuilder()(r.value, QualityPolicy()) for r in raw]
    assert [(e.query, e.positive) for e in examples] == [
        (p["query"], p["positive"]) for p in PAIRS if isinstance(p, dict)
        and p.get("id") in ("a", "b", "n", "long", "z") and p.get("positive") != "again"]
    triplet = sources.TripletBuilder(negatives_list_field="negatives")(raw[2].value,
                                                                       QualityPolicy())
    assert triplet.negatives == ("the louvre museum",)


# ---------------------------------------------------------------------------------- synthetic

PASSAGES = [
    {"id": "p1", "text": "boil the eggs in water => boil eggs water SEED"},   # t=3: kept
    {"id": "p2", "text": "the capital of france => what SEED"},               # t=1: dropped
    {"id": "p3", "text": "def add(a, b) => python add SEED"},                 # t=2: kept
    {"id": "p4", "text": "an empty reply =>"},                                # unparseable
    {"id": "p5", "text": "symbols only => ?!"},                               # unparseable
    {"text": "sort a list => sort list SEED"},                                # t=2: kept
    {"id": "p7"},                                                             # missing_field
    {"id": "p8", "text": ""},                                                 # empty_text
    {"id": "p9", "text": "water boils at 100 degrees => query: 'water boils SEED'"},  # t=2
]
SYNTH_CONFIG = synthetic.SynthesisConfig(batch_size=2)


def test_clean_reply():
    assert synthetic.clean_reply("  how to boil eggs \nPassage: x") == "how to boil eggs"
    assert synthetic.clean_reply(' Query: "eiffel tower height"') == "eiffel tower height"
    assert synthetic.clean_reply("\n\n  second line") == "second line"
    for unusable in ("", "   ", "\n", " ?! ", '""'):
        assert synthetic.clean_reply(unusable) is None


def test_query_prompt_from_a_file(tmp_path):
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({"task": "Write a query.", "examples": [["p one", "q one"]]}))
    prompt = synthetic.QueryPrompt.from_json(str(path))
    assert prompt.render("the passage") == (
        "Write a query.\n\nPassage: p one\nQuery: q one\n\nPassage: the passage\nQuery:")
    path.write_text(json.dumps({"examples": []}))
    with pytest.raises(ValueError, match="a query prompt is"):
        synthetic.QueryPrompt.from_json(str(path))


def test_synthetic_queries_rated_and_dropped_with_scores(tmp_path, caplog):
    source = _write_jsonl(tmp_path / "passages.jsonl", PASSAGES)
    llm = RuleLLM()
    with caplog.at_level(logging.WARNING):
        summary = synthetic.synthesize_queries(str(source), llm, str(tmp_path / "out"),
                                               SYNTH_CONFIG)
    seed = {i: synthetic.passage_seed(0, i) for i in ("p1", "p2", "p3", "line:6", "p9")}
    assert sorted(llm.seeds) == sorted(list(seed.values()) + [synthetic.passage_seed(0, "p4"),
                                                              synthetic.passage_seed(0, "p5")])
    kept = _read(tmp_path / "out" / "kept.jsonl")
    dropped = _read(tmp_path / "out" / "dropped.jsonl")
    assert kept == [
        {"id": "p1", "query": f"boil eggs water {seed['p1']}", "positive": PASSAGES[0]["text"],
         "realism": pytest.approx(EXPECTED_GRADE[3], abs=1e-6)},
        {"id": "p3", "query": f"python add {seed['p3']}", "positive": PASSAGES[2]["text"],
         "realism": pytest.approx(EXPECTED_GRADE[2], abs=1e-6)},
        {"id": "line:6", "query": f"sort list {seed['line:6']}",
         "positive": PASSAGES[5]["text"], "realism": pytest.approx(EXPECTED_GRADE[2], abs=1e-6)},
        {"id": "p9", "query": f"water boils {seed['p9']}", "positive": PASSAGES[8]["text"],
         "realism": pytest.approx(EXPECTED_GRADE[2], abs=1e-6)},
    ]
    assert dropped == [
        {"id": "p2", "query": f"what {seed['p2']}", "positive": PASSAGES[1]["text"],
         "realism": pytest.approx(EXPECTED_GRADE[1], abs=1e-6), "reason": "below_threshold"},
        {"id": "p4", "reply": " ", "positive": PASSAGES[3]["text"], "realism": None,
         "reason": "unparseable_reply"},
        {"id": "p5", "reply": " ?!", "positive": PASSAGES[4]["text"], "realism": None,
         "reason": "unparseable_reply"},
    ]
    assert summary["read"] == 9 and summary["generated"] == 7
    assert summary["kept"] == 4 and summary["dropped"] == 3
    assert summary["drop_rate"] == pytest.approx(3 / 7, abs=1e-6)
    assert summary["dropped_by_reason"] == {"below_threshold": 1, "unparseable_reply": 2}
    assert summary["bad_passages"] == {"empty_text": 1, "missing_field": 1}
    assert summary["bad_replies"] == {"unparseable_reply": 2, "grade_outside_scale": 0}
    messages = [r.getMessage() for r in caplog.records if r.name == synthetic.log.name]
    assert len([m for m in messages if "(unparseable_reply)" in m]) == 1
    assert len([m for m in messages if "(missing_field)" in m]) == 1
    # kept.jsonl is a pair source as it is.
    from gemb.data import sources
    from gemb.data.quality import QualityPolicy

    examples = [sources.PairBuilder()(r.value, QualityPolicy())
                for r in sources.read_jsonl(str(tmp_path / "out" / "kept.jsonl"))]
    assert [e.query for e in examples] == [r["query"] for r in kept]


def test_synthetic_resumes_after_a_crash_with_the_same_output(tmp_path):
    source = _write_jsonl(tmp_path / "passages.jsonl", PASSAGES)
    # The uninterrupted run generates 3 at a time (as for a server): the same records.
    whole = synthetic.synthesize_queries(
        str(source), RuleLLM(), str(tmp_path / "whole"),
        synthetic.SynthesisConfig(batch_size=2, concurrency=3))
    out = tmp_path / "resumed"
    # Batch 1 (p1, p2): 2 generations + 1 rating; batch 2 (p3, p4): the crash in its rating.
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthetic.synthesize_queries(str(source), RuleLLM(fail_after=5), str(out), SYNTH_CONFIG)
    assert len(_read(out / "kept.jsonl") + _read(out / "dropped.jsonl")) == 2
    llm = RuleLLM()
    summary = synthetic.synthesize_queries(str(source), llm, str(out), SYNTH_CONFIG)
    assert summary["already_done"] == 2 and summary["generated"] == 5
    assert len(llm.seeds) == 5
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()
    for key in ("read", "kept", "dropped", "drop_rate", "dropped_by_reason", "bad_passages",
                "bad_replies"):
        assert summary[key] == whole[key], key
    assert whole["kept"] == 4 and whole["dropped"] == 3


def test_resumable_bookkeeping(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    assert resumable.done_ids(path) == set()
    with resumable.AppendWriter(path) as writer:
        writer.write({"id": 1})
        writer.write({"id": "b"})
        assert path.read_text().count("\n") == 2  # flushed per line
    path.write_text(path.read_text() + '{"id": "c", "x')  # torn by a crash
    assert resumable.done_ids(path) == {"1", "b"}
    with resumable.AppendWriter(path) as writer:
        writer.write({"id": "c"})
    assert _read(path) == [{"id": 1}, {"id": "b"}, {"id": "c"}]
    counter = resumable.KindCounter(logging.getLogger("test_counter"), "bad thing")
    with caplog.at_level(logging.WARNING, logger="test_counter"):
        for i in range(3):
            counter.count("x", f"detail {i}")
        counter.count("y")
    assert counter.as_dict() == {"x": 3, "y": 1}
    assert [r.getMessage().split(" [")[0] for r in caplog.records
            if r.name == "test_counter"] == ["bad thing (x): detail 0", "bad thing (y): y"]
    summary = resumable.write_summary(path, {"n": 1})
    assert summary == tmp_path / "summary.json" and json.loads(summary.read_text()) == {"n": 1}


# ------------------------------------------------------------------- the real decoder, TINY


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A TINY folder whose word-level tokenizer covers all 512 ids (so any generated id
    decodes), with the grades 0..3 as words of their own (so the rater's grades differ)."""
    from tiny_checkpoints import write_tiny_llm_folder

    return write_tiny_llm_folder(tmp_path_factory, ["0", "1", "2", "3", "Passage", "Query",
                                                    "Rating"])


def test_synthesize_queries_cli_with_the_real_decoder(model_folder, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "passages.jsonl", [
        {"id": "a", "text": "what is the capital of france : paris is the capital"},
        {"id": "b", "text": "python function returns a list of the text"},
        {"text": "search query retrieval result : the sentence similarity task"},
        {"id": "never", "text": "beyond --max_passages"},
    ])
    outputs = []
    for run in ("one", "two"):
        assert prepare.main(["synthesize-queries", "--input", str(source), "--llm",
                             str(model_folder), "--out", str(tmp_path / run),
                             "--max_passages", "3", "--max_new_tokens", "8"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        files = {name: (tmp_path / run / name).read_text()
                 for name in ("kept.jsonl", "dropped.jsonl")}
        assert json.loads((tmp_path / run / "summary.json").read_text()) == printed
        outputs.append((files, printed))
    (files, summary), (files_again, summary_again) = outputs
    assert files == files_again  # a seed per passage: the same queries and grades
    records = [json.loads(l) for text in files.values() for l in text.splitlines()]
    assert sorted(r["id"] for r in records) == ["a", "b", "line:3"]
    assert summary["read"] == 3 and summary["generated"] == 3
    assert summary["kept"] + summary["dropped"] == 3
    for record in records:
        if record.get("realism") is not None:
            assert 0 <= record["realism"] <= 3 and record["query"].strip()
    for key in ("kept", "dropped", "dropped_by_reason", "bad_replies"):
        assert summary[key] == summary_again[key]
    # The grades 0..3 are tokens of their own here, so the random decoder does not score them
    # alike (all alike would give exactly 1.5).
    grades = [r["realism"] for r in records if r.get("realism") is not None]
    assert all(abs(g - 1.5) > 1e-4 for g in grades)


# ------------------------------------------------------------------ grades outside the scale


class FaultyGradesLLM(RuleLLM):
    """RuleLLM whose grade log-probabilities are broken where the prompt holds a marker: NaN
    ("NANGRADE"), positive ("POSGRADE", not a log-probability) or all -inf ("NOGRADE")."""

    def log_likelihood(self, prompts, continuations):
        out = super().log_likelihood(prompts, continuations)
        for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            if re.fullmatch(r" [0-3]", continuation):
                if "NANGRADE" in prompt:
                    out[i] = np.nan
                elif "POSGRADE" in prompt:
                    out[i] = 2.0
                elif "NOGRADE" in prompt:
                    out[i] = -np.inf
        return out


def test_a_grade_outside_the_scale_is_dropped_counted_and_logged_once(tmp_path, caplog):
    grades = hard_negatives.expected_grade(FaultyGradesLLM(), [
        "Query: a b\nPassage: a b\nRating:", "Query: a NANGRADE\nPassage: a\nRating:",
        "Query: a POSGRADE\nPassage: a\nRating:", "Query: a NOGRADE\nPassage: a\nRating:"])
    assert grades[0] == pytest.approx(EXPECTED_GRADE[2], abs=1e-6)
    assert np.isnan(grades[1:]).all()

    pairs = [{"id": "ok", "query": "boil eggs water", "positive": "boil the eggs in water"},
             {"id": "nan", "query": "eggs NANGRADE", "positive": "eggs"},
             {"id": "pos", "query": "eggs POSGRADE", "positive": "eggs"},
             {"id": "none", "query": "eggs NOGRADE", "positive": "eggs"}]
    source = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    with caplog.at_level(logging.WARNING):
        summary = llm_filter.filter_pairs(str(source), FaultyGradesLLM(), str(tmp_path / "f"),
                                          FILTER_CONFIG)
    assert summary["kept"] == 1 and summary["bad_replies"]["grade_outside_scale"] == 3
    assert summary["dropped_by_reason"] == {"grade_outside_scale": 3}
    dropped = [json.loads(l) for l in (tmp_path / "f" / "dropped.jsonl").open()]
    assert [(r["id"], r["relevance"]) for r in dropped] == [("nan", None), ("pos", None),
                                                            ("none", None)]
    assert sum("grade_outside_scale" in r.message for r in caplog.records) == 1

    passages = [{"id": "p1", "text": "boil the eggs in water => boil eggs water SEED"},
                {"id": "p2", "text": "eggs => eggs NANGRADE SEED"}]
    source = _write_jsonl(tmp_path / "passages.jsonl", passages)
    summary = synthetic.synthesize_queries(str(source), FaultyGradesLLM(), str(tmp_path / "s"),
                                           SYNTH_CONFIG)
    assert summary["kept"] == 1 and summary["dropped_by_reason"] == {"grade_outside_scale": 1}
    assert summary["bad_replies"] == {"unparseable_reply": 0, "grade_outside_scale": 1}


def test_mining_never_chooses_a_candidate_without_a_usable_grade():
    item = hard_negatives.MiningItem(
        hard_negatives.MiningQuery("q", "eggs water", ("pos",)),
        candidates=(("c1", 0.9), ("c2", 0.8), ("c3", 0.7), ("bad", 0.6)),
        texts={"pos": "eggs water", "c1": "eggs water boil", "c2": "eggs", "c3": "water",
               "bad": "NANGRADE"})
    cuts = resumable.KindCounter()
    record = hard_negatives.mine_one(
        item, FaultyGradesLLM(), hard_negatives.MiningConfig(top_k=4, min_rank=0,
                                                             num_negatives=3), cuts)
    assert "bad" not in record["negative_ids"] and len(record["negative_ids"]) == 3
    bad = record["candidates"][3]
    assert bad["id"] == "bad" and bad["relevance"] is None and bad["fused_rank"] is None
    assert cuts["grade_outside_scale"] == 1
    json.dumps(record, allow_nan=False)  # the line stays strict JSON
