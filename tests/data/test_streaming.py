"""Streaming prepared tasks: per-reader shards, exact epochs, bounded shuffle, exact resume."""

import collections

import numpy as np
import pytest

from gemb.data import batching, prepared, streaming
from gemb.data.feature_converter import FeatureConverter, FeatureConverterConfig


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared") / "pairs"
    info = prepared.write_synthetic_task(folder, 1003, 8, task="pairs", num_negatives=1,
                                         vocab_size=300, max_length=12, chunk=400)
    return streaming.PreparedTask("pairs", str(folder)), info


ORDER = streaming.StreamOrder(cycle_length=3, shuffle_window=37, prefetch=1)


def _stream(task, shard_index=0, num_shards=1, batch_size=8, consumed=0, order=ORDER, seed=0):
    return streaming.PreparedStream(task, "train", seed, shard_index, num_shards, batch_size,
                                    consumed, order)


def test_records_round_trip_and_damage_is_named():
    example = prepared.PreparedExample(7, np.array([5, 6], np.int32), np.array([], np.int32),
                                       (np.array([9], np.int32),))
    again = prepared.decode_example(prepared.encode_example(example))
    assert again.example_id == 7 and again.query.tolist() == [5, 6] and again.positive.size == 0
    assert [n.tolist() for n in again.negatives] == [[9]]
    with pytest.raises(prepared.PreparedDataError, match="damaged"):
        prepared.decode_example(prepared.encode_example(example)[:-2], "shard 3 record 9")
    with pytest.raises(prepared.PreparedDataError, match="not a gemb prepared record"):
        prepared.decode_example(b"XXXX" + bytes(20))


def test_group_interleave_is_a_bijection_in_round_robin_order():
    group = streaming._Group([10, 11, 12], [3, 1, 2])
    shards, records = group.locate(np.arange(6))
    assert list(zip(shards.tolist(), records.tolist())) == [
        (10, 0), (11, 0), (12, 0), (10, 1), (12, 1), (10, 2)]


def test_one_epoch_reads_each_example_once_and_readers_own_disjoint_shards(synthetic):
    task, info = synthetic
    order = streaming.StreamOrder(num_readers=4, cycle_length=3, shuffle_window=37)
    streams = [_stream(task, i, 2, batch_size=8, order=order) for i in range(2)]
    epoch = streams[0].epoch_length  # per reader
    assert epoch == min(sum(info.splits["train"].shard_sizes[s] for s in range(r, 8, 4))
                        for r in range(4))
    seen = collections.Counter()
    for _ in range(epoch // 4):  # 4 examples per reader per batch
        for stream in streams:
            seen.update(e.example_id for e in stream.next_examples())
    assert max(seen.values()) == 1  # nothing repeated within the epoch
    assert len(seen) == 4 * 4 * (epoch // 4)  # 4 readers, 4 examples each per batch
    # Reader r reads only shards r and r + 4 (example i is in shard i % 8).
    for stream in streams:
        for plan in stream.plans:
            assert sorted(plan.shard_ids.tolist()) == [plan.reader, plan.reader + 4]
    # An epoch leaves out only what the larger readers hold beyond the smallest one's total.
    assert 4 * epoch >= 1003 - 3


def test_window_shuffle_is_bounded_and_changes_per_epoch(synthetic):
    task, _ = synthetic
    stream = _stream(task, batch_size=37)
    plan = stream.plans[0]

    def pairs(located):
        return list(zip(*(a.tolist() for a in located)))

    window = pairs(plan.window(0, 0))
    unshuffled = pairs(plan.locate(0, np.arange(37)))
    assert sorted(window) == sorted(unshuffled) and window != unshuffled  # shuffled in place
    assert pairs(plan.window(1, 0)) != window  # another shard order and permutation next epoch


def test_resume_mid_epoch_continues_bitwise(synthetic):
    task, _ = synthetic
    uninterrupted = _stream(task, batch_size=24)
    batches = [uninterrupted.next_records() for _ in range(60)]  # crosses epoch boundaries
    for stop in (1, 17, 41):
        resumed = _stream(task, batch_size=24, consumed=stop * 24)
        assert [resumed.next_records() for _ in range(5)] == batches[stop:stop + 5]
        resumed.close()
    uninterrupted.close()


def test_one_process_with_two_readers_equals_two_processes(synthetic):
    task, _ = synthetic
    order = streaming.StreamOrder(num_readers=2, cycle_length=3, shuffle_window=37)
    whole = _stream(task, 0, 1, batch_size=16, order=order)
    halves = [_stream(task, i, 2, batch_size=8, order=order) for i in range(2)]
    for _ in range(30):
        assert whole.next_records() == halves[0].next_records() + halves[1].next_records()


def _batches_and_resume(batcher, count, stop):
    """(the tasks of `count` batches of a fresh batcher; its state after `stop` batches), after
    checking that a batcher built from that state continues with exactly batches[stop:]."""
    run = batcher()
    batches, names = [], []
    for _ in range(count):
        batches.append(next(run))
        names.append(run.last_task)
    interrupted = batcher()
    for _ in range(stop):
        next(interrupted)
    resumed = batcher(interrupted.state)
    for expected in batches[stop:]:
        got = next(resumed)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    return names, interrupted.state


def test_a_mixture_of_prepared_tasks_batches_pads_packs_and_resumes(tmp_path, synthetic):
    task, _ = synthetic
    other_folder = tmp_path / "other"
    prepared.write_synthetic_task(other_folder, 300, 4, task="other", vocab_size=300,
                                  max_length=10, seed=3)
    other = streaming.PreparedTask("other", str(other_folder))
    config = FeatureConverterConfig(query_length=16, document_length=16, pack=True,
                                    num_negatives=1)

    def batcher(state=None):
        return batching.TaskHomogeneousBatcher(
            [(task, 2.0), (other, 1.0)], batch_size=8, converter=FeatureConverter(config),
            shard_info=batching.ShardInfo(0, 1), state=state, stream_order=ORDER)

    tasks, saved = _batches_and_resume(batcher, 12, 5)
    assert set(tasks) == {"pairs", "other"}
    assert "num_readers" in saved
    with pytest.raises(ValueError, match="num_readers"):
        batching.TaskHomogeneousBatcher(
            [(task, 1.0)], batch_size=8, converter=FeatureConverter(config),
            shard_info=batching.ShardInfo(0, 1), state={**saved, "num_readers": 2},
            stream_order=ORDER)


def test_too_few_shards_for_the_readers_is_named(synthetic):
    task, _ = synthetic
    with pytest.raises(ValueError, match="--num_shards >= 16"):
        _stream(task, 0, 16, batch_size=1)


def test_an_epoch_interrupted_and_resumed_reads_every_example_once(synthetic):
    task, _ = synthetic
    batch = 10
    whole = _stream(task, batch_size=batch)
    per_epoch = whole.epoch_length // batch
    uninterrupted = [e.example_id for _ in range(per_epoch) for e in whole.next_examples()]
    stop = per_epoch // 3
    first = _stream(task, batch_size=batch)
    ids = [e.example_id for _ in range(stop) for e in first.next_examples()]
    resumed = _stream(task, batch_size=batch, consumed=stop * batch)  # a new process
    ids += [e.example_id for _ in range(per_epoch - stop) for e in resumed.next_examples()]
    assert ids == uninterrupted
    assert len(set(ids)) == len(ids) == per_epoch * batch  # none repeated, none skipped


def test_prepared_and_in_memory_tasks_mix_and_resume(tmp_path, synthetic, make_toy_task,
                                                     byte_vocab):
    task, _ = synthetic
    toy = make_toy_task("mixed_toy", tmp_path, byte_vocab, 60, num_negatives=1)
    config = FeatureConverterConfig(query_length=24, document_length=32, pack=True,
                                    num_negatives=1)

    def batcher(state=None):
        return batching.TaskHomogeneousBatcher(
            [(toy, 1.0), (task, 1.0)], batch_size=8, converter=FeatureConverter(config),
            shard_info=batching.ShardInfo(0, 1), state=state, stream_order=ORDER)

    names, _ = _batches_and_resume(batcher, 10, 4)
    assert set(names) == {"mixed_toy", "pairs"}


def test_a_folder_tokenised_with_another_vocabulary_is_refused(tmp_path, synthetic):
    from gemb.train.data import SeqioData

    task, _ = synthetic
    (tmp_path / "tokenizer.model").write_bytes(b"not the vocabulary the folder was made with")
    data = SeqioData(vocabulary_dir=str(tmp_path), prepared={"pairs": task.folder},
                     rates={"pairs": 1.0})
    with pytest.raises(ValueError, match="another vocabulary"):
        data.prepared_tasks()
