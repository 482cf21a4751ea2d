"""gs:// paths through gemb's one path library, against a real GCS-compatible server on
127.0.0.1 (tests/gcs_emulator.py): model folders, tokenizers, run logs, checkpoint
quarantine, exports and the eval cache. The 2-process whole run on gs:// is in
tests/multiprocess/test_entry_points.py."""

import json
import os

import numpy as np
import pytest

from gemb import paths
from tiny_checkpoints import write_tiny_model_folder


def test_pathlib_would_turn_a_bucket_into_a_local_folder_but_gemb_paths_do_not():
    from pathlib import Path

    assert str(Path("gs://bucket/run")) == "gs:/bucket/run"  # why gemb never uses it here
    assert str(paths.as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.is_remote("gs://bucket/run") and not paths.is_remote("runs/gs/x")
    assert str(paths.absolute("gs://bucket/run")) == "gs://bucket/run"


def test_model_folder_converted_to_and_read_from_gcs(gcs_dir, tmp_path_factory, tmp_path):
    from gemb.checkpoints import convert
    from gemb.embed import load_encoder
    from gemb.tokenizer import Tokenizer
    from tiny_checkpoints import write_tiny_hf_checkpoint, write_word_level_tokenizer

    source = tmp_path_factory.mktemp("tiny_hf")
    write_tiny_hf_checkpoint(source, seed=0)
    write_word_level_tokenizer(source)
    local = convert.convert(str(source), tmp_path / "local", head_dims=(32,),
                            matryoshka_dims=(16, 32))
    remote = convert.convert(str(source), str(gcs_dir / "model"), head_dims=(32,),
                             matryoshka_dims=(16, 32))
    assert str(remote).startswith("gs://")
    assert (gcs_dir / "model" / "gemb_model.json").is_file()
    assert (gcs_dir / "model" / "tokenizer.json").is_file()
    texts = ["a list of code", "the capital of france"]
    assert Tokenizer.from_dir(remote).encode(texts[0]) == Tokenizer.from_dir(local).encode(texts[0])
    np.testing.assert_array_equal(load_encoder(str(remote)).encode(texts),
                                  load_encoder(str(local)).encode(texts))
    assert not os.path.exists("gs:")


def test_run_logs_on_gcs_follow_resume(gcs_dir):
    from gemb.train import metrics_writer

    logdir = gcs_dir / "run" / "train"
    writer = metrics_writer.TensorBoardWriter(str(logdir))
    writer.scalars(1, {"train/loss": 2.0})
    writer.flush()
    # Visible after a flush while the writer is still open (an object store cannot append).
    assert metrics_writer.read_scalars(str(logdir)) == {"train/loss": [(1, 2.0)]}
    writer.scalars(2, {"train/loss": 1.5})
    writer.close()
    assert metrics_writer.read_scalars(str(logdir))["train/loss"] == [(1, 2.0), (2, 1.5)]

    metrics = gcs_dir / "run" / "train_metrics.jsonl"
    handle = metrics_writer.open_metrics_file(metrics, keep_through_step=0)
    for step in (1, 2, 3):
        handle.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        handle.flush()
    assert len(metrics.read_text().splitlines()) == 3
    handle.close()
    # A resume from step 2 drops step 3's record, then appends after the kept ones.
    handle = metrics_writer.open_metrics_file(metrics, keep_through_step=2)
    handle.write(json.dumps({"step": 3, "loss": 0.25}) + "\n")
    handle.close()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_damaged_checkpoint_on_gcs_is_moved_aside(gcs_dir):
    from gemb.train import checkpointing

    step_dir = gcs_dir / "checkpoints" / "7"
    (step_dir / "state").mkdir(parents=True, exist_ok=True)
    (step_dir / "state" / "a").write_text("x")
    (step_dir / "meta").mkdir(parents=True, exist_ok=True)
    (step_dir / "meta" / "metadata").write_text("{}")
    target = gcs_dir / "checkpoints" / "corrupt" / "7.1"
    checkpointing._move_folder(step_dir, target)
    assert not step_dir.exists()
    assert (target / "state" / "a").read_text() == "x"
    assert (target / "meta" / "metadata").read_text() == "{}"


def test_export_and_eval_cache_on_gcs(gcs_dir, tmp_path_factory):
    from gemb.eval import encoders
    from gemb.export import sentence_transformers as st_export

    folder = write_tiny_model_folder(tmp_path_factory, head_dims=(32,), matryoshka_dims=(16, 32))
    out = st_export.export(str(folder), str(gcs_dir / "st"))
    assert str(out).startswith("gs://")
    local = tmp_path_factory.mktemp("st") / "st"
    st_export.export(str(folder), str(local))
    names = sorted(str(p.relative_to(out)) for p in paths.files_under(out))
    assert names == sorted(str(p.relative_to(local)) for p in paths.files_under(local))
    for name in names:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name

    cache = encoders.EmbeddingCache(str(gcs_dir / "cache"), encoder_key="k")
    calls = []

    def encode(texts, role):
        calls.append(list(texts))
        return np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4)

    first = cache.embed(encode, ["a", "b"], "query")
    again = cache.embed(encode, ["a", "b"], "query")
    np.testing.assert_array_equal(first, again)
    assert calls == [["a", "b"]]  # the second call read the cached object
    assert encoders.model_fingerprint(str(out)) == encoders.model_fingerprint(str(out))


def test_gcs_emulator_is_a_real_server(gcs_server):
    """The clients talk HTTP to the server: a path written through epath is an object the
    server lists over its JSON API."""
    import urllib.request

    from gcs_emulator import BUCKET

    paths.as_path(f"gs://{BUCKET}/probe/hello.txt").write_text("hi")
    with urllib.request.urlopen(f"{gcs_server}/storage/v1/b/{BUCKET}/o?prefix=probe/") as reply:
        listing = json.load(reply)
    assert [item["name"] for item in listing["items"]] == ["probe/hello.txt"]


@pytest.mark.parametrize("bad", ["gs://gemb-test/no-such-model", "gs://no-such-bucket/model"])
def test_missing_remote_model_folder_is_a_clear_error(gcs_server, bad):
    from gemb.eval import encoders

    with pytest.raises(FileNotFoundError, match="no such folder"):
        encoders.load_encoder(bad)


def test_training_vocabulary_from_a_gcs_model_folder(gcs_dir, tmp_path):
    from gemb.train.data import SeqioData
    from tiny_checkpoints import write_word_level_tokenizer

    write_word_level_tokenizer(tmp_path)
    (gcs_dir / "model" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    remote = SeqioData(vocabulary_dir=str(gcs_dir / "model")).vocabulary()
    local = SeqioData(vocabulary_dir=str(tmp_path)).vocabulary()
    text = "the capital of france"
    assert remote.encode(text) == local.encode(text) and len(local.encode(text)) == 4


def test_prepared_task_written_to_and_streamed_from_gcs(gcs_dir, tmp_path):
    from gemb.data import prepared, streaming

    local = tmp_path / "pairs"
    info = prepared.write_synthetic_task(local, 200, 4, task="pairs", vocab_size=300, max_length=8)
    remote = gcs_dir / "prepared" / "pairs"
    for index, size in enumerate(info.splits["train"].shard_sizes):  # the prepare job's writer
        name = prepared.shard_name("train", index, 4)
        reader = prepared.ShardReader(local / name, size)
        prepared.write_shard(remote / name, reader.read_range(0, size))
    prepared.write_info(remote, info)

    def records(folder):
        stream = streaming.PreparedStream(streaming.PreparedTask("pairs", str(folder)), "train",
                                          0, 0, 1, 16, 0)
        return [stream.next_records() for _ in range(15)]

    assert records(remote) == records(local)
    assert prepared.read_info(remote) == info
