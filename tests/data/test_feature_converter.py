import numpy as np
import pytest

from gemb.data import feature_converter as fc
from gemb.data.feature_converter import FeatureConverter, FeatureConverterConfig, RoleTokens, TokenBatch


def _random_batch(batch_size=24, k=2, seed=0, max_len=40):
    rng = np.random.default_rng(seed)

    def texts(n):
        return [rng.integers(3, 500, rng.integers(1, max_len)).tolist() for _ in range(n)]

    num_negatives = rng.integers(0, k + 1, batch_size).astype(np.int32)
    negatives = texts(batch_size * k)
    for b in range(batch_size):
        for j in range(num_negatives[b], k):
            negatives[b * k + j] = []
    return TokenBatch(RoleTokens.from_lists(texts(batch_size)), RoleTokens.from_lists(texts(batch_size)),
                      RoleTokens.from_lists(negatives), num_negatives)


def _expected(batch, config):
    """What every example should read back as: BOS + ids (cut) + optional EOS."""
    def wrap(ids, role):
        room = config.max_length(role) - config.num_special_tokens
        out = list(ids[:room])
        if config.bos_id is not None:
            out = [config.bos_id] + out
        if config.eos_id is not None:
            out = out + [config.eos_id]
        return tuple(out)

    k = batch.negatives_per_example
    negatives = batch.negatives.sequences()
    return {
        "query": [wrap(s.tolist(), "query") for s in batch.query.sequences()],
        "positive": [wrap(s.tolist(), "positive") for s in batch.positive.sequences()],
        "negatives": [tuple(wrap(negatives[b * k + j].tolist(), "negatives") for j in range(batch.num_negatives[b]))
                      for b in range(batch.batch_size)],
    }


@pytest.mark.parametrize("eos", [None, 1])
def test_packed_batches_hold_exactly_the_examples_of_padded_ones(eos):
    batch = _random_batch()
    padded_cfg = FeatureConverterConfig(query_length=32, document_length=64, eos_id=eos, min_length=8)
    packed_cfg = FeatureConverterConfig(query_length=32, document_length=64, eos_id=eos, min_length=8,
                                        pack=True, segments_per_row=4)
    padded = FeatureConverter(padded_cfg).convert(batch)
    packed = FeatureConverter(packed_cfg).convert(batch)
    expected = _expected(batch, padded_cfg)
    assert fc.examples_in_features(padded) == expected
    assert fc.examples_in_features(packed) == expected
    for key in ("query_hash", "positive_hash", "negative_hash", "negative_mask"):
        np.testing.assert_array_equal(padded[key], packed[key])
    assert fc.padding_fraction(packed) < fc.padding_fraction(padded)
    assert packed["query_tokens"].shape[0] < batch.batch_size


def test_feature_names_shapes_and_dtypes():
    """Padded: example-major, every feature led by the batch, negatives [B, K, L], no slots."""
    batch = _random_batch(batch_size=8, k=2)
    features = FeatureConverter(FeatureConverterConfig(query_length=32, document_length=64, min_length=8)).convert(batch)
    for role, leading in (("query", (8,)), ("positive", (8,)), ("negatives", (8, 2))):
        length = features[f"{role}_tokens"].shape[-1]
        assert length in (8, 16, 32, 64)
        shape = leading + (length,)
        assert features[f"{role}_tokens"].shape == shape and features[f"{role}_tokens"].dtype == np.int32
        assert features[f"{role}_segment_ids"].shape == shape
        assert features[f"{role}_positions"].dtype == np.int32
        assert f"{role}_segment_mask" not in features
    assert not any(key.endswith("_slot") for key in features) and not fc.is_packed(features)
    assert features["negative_mask"].dtype == bool and features["query_hash"].dtype == np.int32
    np.testing.assert_array_equal(features["negative_mask"].sum(1), batch.num_negatives)
    assert (features["negative_hash"][~features["negative_mask"]] == 0).all()


def test_packed_rows_have_restarting_positions_and_bos_per_segment():
    batch = _random_batch(batch_size=16, k=1, seed=3, max_len=10)
    cfg = FeatureConverterConfig(query_length=64, document_length=64, pack=True, segments_per_row=8, min_length=64)
    features = FeatureConverter(cfg).convert(batch)
    tokens, segments, positions = (features[f"query_{k}"] for k in ("tokens", "segment_ids", "positions"))
    for row in range(tokens.shape[0]):
        for segment in range(1, 9):
            where = np.flatnonzero(segments[row] == segment)
            if len(where):
                assert (np.diff(where) == 1).all()  # contiguous
                assert positions[row, where].tolist() == list(range(len(where)))
                assert tokens[row, where[0]] == fc.GEMMA_BOS_ID
        assert (tokens[row][segments[row] == 0] == cfg.pad_id).all()
    assert features["query_segment_mask"].shape[1] == 8
    assert features["query_segment_mask"].sum() == 16
    assert (segments.max(axis=1) <= 8).all()


def test_hashes_follow_token_ids():
    same = [5, 6, 7]
    batch = TokenBatch(RoleTokens.from_lists([same, same, [5, 6], [7, 6, 5]]),
                       RoleTokens.from_lists([[1], [1], [2], [3]]),
                       RoleTokens.from_lists([]), np.zeros(4, np.int32))
    features = FeatureConverter(FeatureConverterConfig(query_length=16, document_length=16)).convert(batch)
    q = features["query_hash"]
    assert q[0] == q[1] and len({q[0], q[2], q[3]}) == 3
    p = features["positive_hash"]
    assert p[0] == p[1] != p[2]
    # Pair tasks (K = 0): no negatives features at all, nothing to encode.
    assert not any(key.startswith("negative") for key in features)


def test_long_texts_are_cut_to_the_role_length():
    batch = TokenBatch(RoleTokens.from_lists([list(range(3, 103))]), RoleTokens.from_lists([list(range(3, 13))]),
                       RoleTokens.from_lists([]), np.zeros(1, np.int32))
    cfg = FeatureConverterConfig(query_length=20, document_length=32, eos_id=1)
    features = FeatureConverter(cfg).convert(batch)
    query = fc.examples_in_features(features)["query"][0]
    assert len(query) == 20 and query[0] == 2 and query[-1] == 1 and query[1:-1] == tuple(range(3, 21))


def test_fixed_num_negatives_pads_every_task_to_k():
    batch = _random_batch(batch_size=6, k=1)
    features = FeatureConverter(FeatureConverterConfig(num_negatives=3)).convert(batch)
    assert features["negative_mask"].shape == (6, 3)
    np.testing.assert_array_equal(features["negative_mask"][:, 0], batch.num_negatives > 0)
    assert not features["negative_mask"][:, 1:].any()


def test_an_agreed_larger_layout_only_adds_padding():
    batch = _random_batch(seed=5)
    converter = FeatureConverter(FeatureConverterConfig(query_length=64, document_length=64, pack=True, min_length=8))
    own = converter.plan(batch).layout
    bigger = {k: v * 2 if k.endswith(("_rows", "_length")) else v for k, v in own.items()}
    features = converter.convert(batch, bigger)
    assert features["query_tokens"].shape == (bigger["query_rows"], bigger["query_length"])
    assert fc.examples_in_features(features) == fc.examples_in_features(converter.convert(batch))
    smaller = dict(own, positive_length=own["positive_length"] // 2)
    with pytest.raises(ValueError, match="too small"):
        converter.convert(batch, smaller)


def test_row_buckets_bound_the_number_of_shapes():
    counts = {fc.round_up_rows(r, 1, 8) for r in range(1, 1025)}
    assert len(counts) <= 8 * 10 + 8
    for rows in range(1, 1025):
        rounded = fc.round_up_rows(rows, 4, 8)
        assert rounded >= rows and rounded % 4 == 0 and rounded <= max(rows * 1.126, rows + 4)


def test_length_buckets():
    cfg = FeatureConverterConfig(query_length=100, min_length=16)
    assert cfg.buckets("query") == (16, 32, 64, 100)
    assert FeatureConverterConfig(length_buckets=(256, 64)).buckets("positive") == (64, 256, 512)
    assert FeatureConverterConfig(query_length=100, length_buckets=()).buckets("query") == (100,)


def _first_fit_decreasing(lengths, capacity, segments):
    """The textbook loop, as a reference for the vectorised packer."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    free, used, placement = [], [], {}
    for i in order:
        for r in range(len(free)):
            if free[r] >= lengths[i] and used[r] < segments:
                break
        else:
            free.append(capacity)
            used.append(0)
            r = len(free) - 1
        placement[i] = (r, capacity - free[r], used[r] + 1)
        free[r] -= lengths[i]
        used[r] += 1
    return placement, len(free)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_packing_is_first_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, 200)
    lengths[rng.random(200) < 0.3] = rng.integers(1, 4)  # many ties
    segments = int(rng.integers(1, 9))
    converter = FeatureConverter(FeatureConverterConfig(pack=True, segments_per_row=segments))
    row, start, segment, rows = converter._pack(lengths, 32)
    expected, expected_rows = _first_fit_decreasing(lengths.tolist(), 32, segments)
    assert rows == expected_rows
    for i, n in enumerate(lengths):
        if n:
            assert (row[i], start[i], segment[i]) == expected[i]
        else:
            assert row[i] == -1


@pytest.mark.slow
def test_packed_and_padded_features_give_the_model_the_same_embeddings():
    """End to end through the model seam: EmbeddingModel.embed_fn reads either layout and gives
    every example the same embedding (the slots pick each example's (row, segment))."""
    jax = pytest.importorskip("jax")
    from gemb.models.config import TINY_ENCODER, AttentionType
    from gemb.train.model import EmbeddingModel

    batch = _random_batch(batch_size=10, k=2, seed=7, max_len=30)
    common = dict(query_length=64, document_length=64, min_length=8)
    padded = FeatureConverter(FeatureConverterConfig(**common)).convert(batch)
    packed = FeatureConverter(FeatureConverterConfig(pack=True, segments_per_row=4, **common)).convert(batch)
    assert packed["query_tokens"].shape[0] < 10  # several examples share a row
    # Two layers, one sliding-window and one global: every attention kind packing could break.
    transformer = TINY_ENCODER.transformer.replace(
        num_layers=2, attention_pattern=(AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL))
    model = EmbeddingModel(TINY_ENCODER.replace(transformer=transformer))
    params = model.init_params(0)
    embed = jax.jit(model.embed_fn)
    a, b = embed(params, padded), embed(params, packed)
    mask = padded["negative_mask"]
    for role in ("query", "positive", "negatives"):
        x, y = np.asarray(a[role]), np.asarray(b[role])
        if role == "negatives":
            x, y = x[mask], y[mask]
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
        assert np.abs(x[0] - x[1]).max() > 1e-3  # different examples, different embeddings


# --- pack groups: the microbatches of a packed batch ---------------------------------------


def _examples(batch, lo, hi):
    """Examples lo..hi-1 of a TokenBatch as a TokenBatch (one host's block)."""
    k = batch.negatives_per_example
    negatives = batch.negatives.sequences()[lo * k:hi * k]
    return TokenBatch(RoleTokens.from_lists(batch.query.sequences()[lo:hi]),
                      RoleTokens.from_lists(batch.positive.sequences()[lo:hi]),
                      RoleTokens.from_lists(negatives), batch.num_negatives[lo:hi])


def _microbatch_examples(features, microbatches):
    """What each microbatch of the step reads: EmbeddingModel.split_microbatches (the strided
    split of examples and rows, slots renumbered into the microbatch's rows), read back."""
    jax = pytest.importorskip("jax")
    from gemb.train.model import EmbeddingModel

    split = jax.tree.map(np.asarray, EmbeddingModel.split_microbatches(features, microbatches))
    return [fc.examples_in_features({name: value[m] for name, value in split.items()})
            for m in range(microbatches)]


def _only(expected, picked):
    return {role: [examples[b] for b in picked] for role, examples in expected.items()}


def test_pack_groups_put_each_microbatch_in_rows_of_its_own():
    batch = _random_batch(batch_size=24, k=2, seed=11, max_len=12)
    cfg = FeatureConverterConfig(query_length=32, document_length=32, min_length=8, pack=True,
                                 segments_per_row=4)
    groups = 3
    features = FeatureConverter(cfg, row_multiple=2, pack_groups=groups).convert(batch)
    expected = _expected(batch, cfg)
    assert fc.examples_in_features(features) == expected  # still a valid full batch
    fc.check_pack_groups(features, groups)
    for role, slot in (("query", "query_slot"), ("positive", "positive_slot"),
                       ("negatives", "negative_slot")):
        mask = features[f"{role}_segment_mask"]
        assert mask.shape[0] % (groups * 2) == 0  # groups x a multiple of row_multiple rows
        assert mask.sum(axis=1).max() > 1  # rows hold several examples
        rows = features[slot] // mask.shape[1]
        example, present = np.arange(24), np.ones(24, bool)
        if role == "negatives":
            example, present = np.repeat(example, 2).reshape(24, 2), features["negative_mask"]
        assert (rows[present] % groups == example[present] % groups).all()
        # Group m's rows hold exactly group m's texts.
        for m in range(groups):
            assert mask[m::groups].sum() == present[m::groups].sum()
    for m, seen in enumerate(_microbatch_examples(features, groups)):
        assert seen == _only(expected, range(m, 24, groups))
    # One group for all: examples of different microbatches share rows, which the check names.
    mixed = FeatureConverter(cfg, row_multiple=groups).convert(batch)
    with pytest.raises(ValueError, match=r"not its own microbatch .*pack_groups=3"):
        fc.check_pack_groups(mixed, groups)
    with pytest.raises(ValueError, match="cannot be packed in pack_groups=5"):
        FeatureConverter(cfg, pack_groups=5).plan(batch)


def test_pack_groups_across_hosts_share_one_layout_and_global_slots():
    """Two hosts of 12 examples each, 2 microbatches: microbatch m is the global examples
    m, m + 2, ... (host 1's examples are 12..23), in the rows the step's split hands it."""
    batch = _random_batch(batch_size=24, k=1, seed=4, max_len=12)
    # Host 1's texts are longer: its own plan needs more rows, the agreed layout is the max.
    long_texts = _random_batch(batch_size=12, k=1, seed=5, max_len=30)
    hosts = [_examples(batch, 0, 12), long_texts]
    cfg = FeatureConverterConfig(query_length=32, document_length=32, min_length=8, pack=True,
                                 segments_per_row=4)
    converters = [FeatureConverter(cfg, row_multiple=2, shard_index=h, pack_groups=2)
                  for h in range(2)]
    plans = [c.plan(b) for c, b in zip(converters, hosts)]
    assert plans[0].layout != plans[1].layout
    layout = {key: max(p.layout[key] for p in plans) for key in plans[0].layout}
    blocks = [c.convert(p, layout) for c, p in zip(converters, plans)]
    # What Partitioner.place_batch makes of the hosts' blocks: one global batch.
    features = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    expected = {role: _expected(hosts[0], cfg)[role] + _expected(hosts[1], cfg)[role]
                for role in fc.ROLES}
    assert fc.examples_in_features(features) == expected
    rows_per_host = layout["query_rows"]
    assert blocks[1]["query_slot"].min() >= rows_per_host * 4  # after host 0's rows
    for block in blocks:
        fc.check_pack_groups(block, 2)
    for m, seen in enumerate(_microbatch_examples(features, 2)):
        assert seen == _only(expected, range(m, 24, 2))
    with pytest.raises(ValueError, match="not a multiple of pack_groups=2"):
        converters[1].convert(plans[1], dict(layout, query_rows=layout["query_rows"] + 1))
