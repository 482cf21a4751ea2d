import json

import numpy as np
import pytest
import seqio

from gemb.data import batching, mixtures
from gemb.data import feature_converter as fc
from gemb.data.feature_converter import FeatureConverter, FeatureConverterConfig

RATES = {"mix_a": 0.5, "mix_b": 0.3, "mix_c": 0.2}


@pytest.fixture
def three_tasks(tmp_path, byte_vocab, make_toy_task):
    # Small tasks with different K, so batches wrap around epochs often.
    make_toy_task("mix_a", tmp_path, byte_vocab, 30, num_negatives=0, seed=1)
    make_toy_task("mix_b", tmp_path, byte_vocab, 21, num_negatives=1, seed=2)
    make_toy_task("mix_c", tmp_path, byte_vocab, 13, num_negatives=2, seed=3)
    return mixtures.register_mixture("mix_three", RATES)


def _converter(pack=False):
    return FeatureConverter(FeatureConverterConfig(query_length=64, document_length=128, min_length=16,
                                                   pack=pack, segments_per_row=4))


def _texts(byte_vocab, features, role="query"):
    # Strip BOS, decode the bytes.
    return [byte_vocab.decode(list(ids[1:])) for ids in fc.examples_in_features(features)[role]]


def _query_texts(byte_vocab, token_batch):
    return [byte_vocab.decode(s.tolist()) for s in token_batch.query.sequences()]


def test_batches_are_single_task_at_mixture_rates(three_tasks, byte_vocab):
    batcher = batching.TaskHomogeneousBatcher("mix_three", batch_size=2, converter=_converter(),
                                              shard_info=seqio.ShardInfo(0, 1), seed=7)
    counts = dict.fromkeys(RATES, 0)
    num_batches = 2000
    for _ in range(num_batches):
        token_batch = batcher.next_token_batch()
        task = batcher.last_task
        counts[task] += 1
        assert token_batch.task == task
        assert all(q.startswith(f"task: search result | query: {task} q ") for q in _query_texts(byte_vocab, token_batch))
    total = sum(RATES.values())
    for task, rate in RATES.items():
        p = rate / total
        sigma = np.sqrt(num_batches * p * (1 - p))
        assert abs(counts[task] - num_batches * p) <= 3 * sigma, (task, counts)


def test_same_seed_same_batches_and_other_seed_differs(three_tasks):
    def run(seed, n=25):
        batcher = batching.TaskHomogeneousBatcher("mix_three", 4, _converter(pack=True),
                                                  shard_info=seqio.ShardInfo(0, 1), seed=seed)
        return [next(batcher) for _ in range(n)]

    first, second, other = run(1), run(1), run(2)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["query_hash"], c["query_hash"]) for a, c in zip(first, other))


@pytest.mark.parametrize("pack", [False, True])
def test_restoring_the_state_after_batch_k_continues_exactly(three_tasks, pack):
    k, more = 10, 50
    uninterrupted = batching.TaskHomogeneousBatcher("mix_three", 4, _converter(pack), shard_info=seqio.ShardInfo(0, 1), seed=3)
    reference = []
    saved = None
    for index in range(k + more):
        reference.append(next(uninterrupted))
        if index + 1 == k:
            saved = json.loads(json.dumps(uninterrupted.state))  # survives a round trip through JSON
    assert all(isinstance(v, int) for v in saved.values()) and saved["batch_index"] == k
    resumed = batching.TaskHomogeneousBatcher("mix_three", 4, _converter(pack), shard_info=seqio.ShardInfo(0, 1), seed=3,
                                              state=saved)
    for index in range(more):
        batch = next(resumed)
        expected = reference[k + index]
        assert batch.keys() == expected.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[key], err_msg=f"batch {k + index + 1} {key}")
    assert resumed.state == uninterrupted.state
    # restore() on a live batcher does the same.
    uninterrupted.restore(saved)
    np.testing.assert_array_equal(next(uninterrupted)["query_tokens"], reference[k]["query_tokens"])


def test_a_state_from_another_seed_or_host_count_is_refused(three_tasks):
    batcher = batching.TaskHomogeneousBatcher("mix_three", 4, _converter(), shard_info=seqio.ShardInfo(0, 1), seed=3)
    with pytest.raises(ValueError, match="seed"):
        batcher.restore(dict(batcher.state, seed=4))
    with pytest.raises(ValueError, match="num_shards"):
        batcher.restore(dict(batcher.state, num_shards=2))


@pytest.mark.parametrize("num_examples", [40, 41])
def test_two_hosts_read_disjoint_examples_covering_an_epoch(tmp_path, byte_vocab, make_toy_task, num_examples):
    make_toy_task("hosts_task", tmp_path, byte_vocab, num_examples)
    per_epoch_batches = (num_examples // 2) // 4
    seen = []
    for index in range(2):
        batcher = batching.TaskHomogeneousBatcher([("hosts_task", 1.0)], batch_size=8, converter=_converter(),
                                                  shard_info=seqio.ShardInfo(index, 2), seed=11,
                                                  agree_on_layout=lambda layout: layout)
        queries = []
        for _ in range(per_epoch_batches):
            queries += _query_texts(byte_vocab, batcher.next_token_batch())
        seen.append(queries)
    host0, host1 = set(seen[0]), set(seen[1])
    assert len(host0) == len(seen[0]) == len(host1) == num_examples // 2
    assert not host0 & host1
    assert len(host0 | host1) == 2 * (num_examples // 2)  # all of them when N is even


def test_global_batch_must_split_over_hosts(three_tasks):
    with pytest.raises(ValueError, match="divisible"):
        batching.TaskHomogeneousBatcher("mix_three", 5, _converter(), shard_info=seqio.ShardInfo(0, 2))


def test_epoch_order_is_a_partition():
    orders = [batching.epoch_order(0, "t", 0, 10, h, 3) for h in range(3)]
    flat = np.concatenate(orders)
    assert len(flat) == 9 and len(set(flat.tolist())) == 9
    assert not np.array_equal(batching.epoch_order(0, "t", 1, 10, 0, 3), orders[0])


def test_layout_agreement_is_the_identity_on_one_process():
    layout = {"query_rows": 3, "query_length": 64}
    assert fc.agree_across_processes(dict(layout)) == layout


def test_prepare_reads_every_source_without_moving_the_state(three_tasks):
    batcher = batching.TaskHomogeneousBatcher("mix_three", 4, _converter(), shard_info=seqio.ShardInfo(0, 1), seed=3)
    before = batcher.state
    batcher.prepare()
    assert batcher.state == before
    fresh = batching.TaskHomogeneousBatcher("mix_three", 4, _converter(), shard_info=seqio.ShardInfo(0, 1), seed=3)
    np.testing.assert_array_equal(next(batcher)["query_tokens"], next(fresh)["query_tokens"])
