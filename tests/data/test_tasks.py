import gin
import pytest
import seqio

from gemb.data import batching, feature_converter, mixtures, quality, tasks

EXPECTED_TRAIN_EXAMPLES = {
    tasks.STSB_TRAIN: None,  # pairs with score >= 4.0: checked against the file below
    tasks.SNLI_TRIPLETS: 5864,
    tasks.BANKING77_TRAIN: 10003,
    tasks.COSQA_DEV: 500,
}


def _stsb_positives(root):
    rows = [l.rstrip("\n").split("\t") for l in open(root / "stsbenchmark" / "sts-train.csv", encoding="utf-8")]
    return sum(float(r[4]) >= tasks.STS_POSITIVE_THRESHOLD for r in rows)


@pytest.mark.needs_shared
def test_shared_tasks_register_under_stable_names(shared_data, byte_vocab):
    names = tasks.register_shared_tasks(byte_vocab, root=shared_data)
    assert names == list(tasks.SHARED_TASKS)
    for name in names:
        task = seqio.TaskRegistry.get(name)
        examples = task.source.examples("train")
        expected = EXPECTED_TRAIN_EXAMPLES[name] or _stsb_positives(shared_data)
        assert len(examples["query"]) == expected, name
        assert quality.report_for(name, "train").num_bad == 0
    snli = seqio.TaskRegistry.get(tasks.SNLI_TRIPLETS).source.examples("train")
    assert snli["negatives"].shape == (5864, 1) and (snli["num_negatives"] == 1).all()
    banking = seqio.TaskRegistry.get(tasks.BANKING77_TRAIN).source.examples("train")
    assert banking["positive"][0] == "card arrival" and len(set(banking["positive"])) == 77
    cosqa = seqio.TaskRegistry.get(tasks.COSQA_DEV).source.examples("train")
    assert cosqa["positive"][0].startswith("def ")


@pytest.mark.needs_shared
def test_shared_mixture_batches_carry_the_duplicate_mask_inputs(shared_data, byte_vocab):
    mixture = mixtures.build_mixture(byte_vocab, name=mixtures.SHARED_FINETUNE,
                                     rates={tasks.BANKING77_TRAIN: 1.0, tasks.SNLI_TRIPLETS: 1.0})
    assert [t.name for t in mixture.tasks] == [tasks.BANKING77_TRAIN, tasks.SNLI_TRIPLETS]
    converter = feature_converter.FeatureConverter(feature_converter.FeatureConverterConfig(
        query_length=64, document_length=64, pack=True))
    batcher = batching.TaskHomogeneousBatcher(mixture, 64, converter, shard_info=seqio.ShardInfo(0, 1), seed=0)
    for _ in range(6):
        features = next(batcher)
        if batcher.last_task == tasks.BANKING77_TRAIN:
            # 64 texts over 77 labels: some positives repeat, and their hashes say so.
            assert len(set(features["positive_hash"].tolist())) < 64
            assert "negative_mask" not in features  # a pair task: no negatives features
        else:
            assert features["negative_mask"].all() and features["negative_mask"].shape == (64, 1)


def test_shared_tasks_are_absent_without_the_folder(tmp_path, byte_vocab):
    assert tasks.register_shared_tasks(byte_vocab, root=tmp_path / "missing") == []


def test_docstring_task_registers_without_reading(byte_vocab):
    assert tasks.register_default_tasks(byte_vocab, include_shared=False) == [tasks.DOCSTRING_CODE]
    task = seqio.TaskRegistry.get(tasks.DOCSTRING_CODE)
    assert set(task.splits) == {"train", "validation", "test"}
    assert tasks.num_negatives(task) == 0


def test_mixture_rates_and_missing_tasks(tmp_path, byte_vocab, make_toy_task):
    make_toy_task("rates_a", tmp_path, byte_vocab, 5)
    make_toy_task("rates_b", tmp_path, byte_vocab, 5)
    mixture = mixtures.register_mixture("rates_mix", {"rates_a": 3, "rates_b": 1, "rates_gone": 2, "rates_zero": 0})
    assert [(t.name, mixture.get_rate(t)) for t in mixture.tasks] == [("rates_a", 3.0), ("rates_b", 1.0)]
    with pytest.raises(ValueError, match="not registered"):
        mixtures.register_mixture("rates_strict", {"rates_a": 1, "rates_gone": 1}, require_all_tasks=True)
    with pytest.raises(ValueError, match="negative"):
        mixtures.register_mixture("rates_neg", {"rates_a": -1})


def test_mixture_from_gin(byte_vocab):
    """A mixture defined in gin reaches the library through the data config gin builds."""
    from gemb.train import gin_registry

    gin_registry.register()
    with gin.unlock_config():
        gin.parse_config("SeqioData.mixture = 'gin_mix'\n"
                         "SeqioData.rates = {'gemb_docstring_code': 2.0}")
    try:
        data = gin.get_configurable("SeqioData")()
    finally:
        gin.clear_config()
    mixture = mixtures.build_mixture(byte_vocab, name=data.mixture, rates=data.rates)
    assert mixture.name == "gin_mix" and mixture.get_rate(mixture.tasks[0]) == 2.0
