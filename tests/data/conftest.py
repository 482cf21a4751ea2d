"""Fixtures of the data tests: offline vocabularies and toy tasks built in a temp folder."""

import io
import json

import numpy as np
import pytest
import seqio

from gemb.data import sources, tasks, templates

_WORDS = (
    "the a man woman dog cat plays runs reads writes code function returns list value file "
    "string number sorted open close bank card account money transfer question answer python "
    "data model train test query document title text search result similar sentence label"
).split()


@pytest.fixture(scope="session")
def byte_vocab():
    return seqio.ByteVocabulary()


@pytest.fixture(scope="session")
def sentencepiece_vocab(tmp_path_factory):
    """A 200-piece SentencePiece model trained in the test on generated sentences."""
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(_WORDS, size=rng.integers(4, 12))) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(model.getvalue())
    return seqio.SentencePieceVocabulary(str(path))


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)


def _make_toy_task(name, folder, vocabulary, num_examples, num_negatives=0, seed=0, kind="search"):
    """A registered task whose texts name the task and the example index ('<name> q 12 ...')."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_examples):
        record = {
            "query": f"{name} q {i} " + " ".join(rng.choice(_WORDS, size=rng.integers(1, 8))),
            "positive": f"{name} p {i} " + " ".join(rng.choice(_WORDS, size=rng.integers(1, 20))),
        }
        record["negatives"] = [f"{name} n {i} {k} " + " ".join(rng.choice(_WORDS, size=rng.integers(1, 10)))
                               for k in range(int(rng.integers(0, num_negatives + 1)))]
        records.append(record)
    path = _write_jsonl(folder / f"{name}.jsonl", records)
    builder = sources.TripletBuilder(negatives_list_field="negatives", min_negatives=0)
    tasks.add_embedding_task(
        name, {"train": lambda: sources.read_jsonl(path)}, builder, vocabulary,
        templates.default_template(kind), num_negatives=num_negatives,
    )
    return seqio.TaskRegistry.get(name)


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def make_toy_task():
    """make_toy_task(name, folder, vocabulary, num_examples, num_negatives=0, seed=0) -> Task."""
    return _make_toy_task
