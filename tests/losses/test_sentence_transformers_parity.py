"""gemb's loss against sentence-transformers' MultipleNegativesRankingLoss and MatryoshkaLoss.

Both libraries get the same embeddings (CPU torch, float64) and the same scale = 1 / tau, and
agree to 1e-6 wherever their semantics coincide:

  * MNRL with (anchor, positive, negative_1, ..., negative_k) columns uses every negative of
    the batch as a candidate for every anchor: gemb with use_other_hard_negatives=True.
  * MNRL directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction" averages
    the two directions' cross-entropies: gemb's symmetric=True.
  * MNRL directions=("query_to_doc", "query_to_query"), partition_mode="joint" puts the other
    queries into the same softmax: gemb's query_query_negatives=True.
  * MatryoshkaLoss sums weight_d * loss(normalised prefix_d): gemb's matryoshka_dims/weights.

Where they differ, and why:

  * Duplicate texts. gemb removes in-batch candidates that are the same text as the query's
    positive (or whose query is the same text), decided from token hashes; MNRL has no such
    mask and asks for a NO_DUPLICATES batch sampler instead. The recipe needs the mask because
    classification-style batches repeat a handful of label strings by construction, which a
    sampler cannot avoid. The parity below uses batches without duplicates; test_contrastive.py
    shows the two losses part ways once positives repeat.
  * Missing hard negatives. MNRL needs the same number of negative columns for every row;
    gemb takes a [B, K] validity mask so pre-finetuning (no negatives) and fine-tuning batches
    with 0..K negatives share one loss. With all negatives present the two agree.
  * Own vs all hard negatives. MNRL always scores a query against every row's negatives; gemb
    defaults to the query's own negatives (docs/recipe.md: n_i in the denominator), the other rows'
    being an option.
  * Symmetric term with same-tower negatives. MNRL's per_direction mode refuses
    query_to_query; gemb allows both (query-query terms join the query row's softmax, the
    document -> query row is separate), so that combination has no MNRL counterpart.
  * Label smoothing and a learnt, clipped temperature exist only in gemb; MNRL's hardness
    weighting and doc_to_doc direction exist only in sentence-transformers.
  * MatryoshkaLoss sorts dims largest first and can sample n_dims_per_step of them; gemb
    requires increasing dims and always uses all, so the weighted sums match term by term.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemb.losses import ContrastiveLossConfig, matryoshka_contrastive_loss  # noqa: E402

TEMPERATURE = 0.05
BATCH, DIM = 6, 16


class FixedEmbeddings(torch.nn.Module):
    """A module whose input "features" already are the embeddings."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, features):
        # A fresh dict per call: MatryoshkaLoss's forward decorator overwrites the entry.
        return {"sentence_embedding": features["embedding"]}

    def get_embedding_dimension(self):
        return self.dim


def fixed_embedding_model(dim):
    """A real SentenceTransformer around FixedEmbeddings, so the losses see the model class
    they are written for (they call its methods, private ones included) on any version."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[FixedEmbeddings(dim)], device="cpu")


def random_columns(seed, num_negatives):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(BATCH, DIM)) for _ in range(2 + num_negatives)]


def gemb_value(columns, config):
    query, positive, *negatives = columns
    embeddings = {"query": jnp.asarray(query), "positive": jnp.asarray(positive)}
    batch = {
        "query_hash": jnp.arange(BATCH, dtype=jnp.int32),
        "positive_hash": jnp.arange(BATCH, 2 * BATCH, dtype=jnp.int32),
    }
    if negatives:
        embeddings["negatives"] = jnp.asarray(np.stack(negatives, axis=1))
        batch["negative_mask"] = jnp.ones((BATCH, len(negatives)), bool)
        batch["negative_hash"] = jnp.arange(len(negatives) * BATCH, dtype=jnp.int32).reshape(BATCH, -1) + 100
    with jax.enable_x64(True):
        return float(matryoshka_contrastive_loss(embeddings, batch, config=config)[0])


def mnrl(**kwargs):
    return st_losses.MultipleNegativesRankingLoss(
        fixed_embedding_model(DIM), scale=1.0 / TEMPERATURE, **kwargs
    )


def st_value_from_embeddings(loss, columns):
    tensors = [torch.from_numpy(c) for c in columns]
    return float(loss.compute_loss_from_embeddings(tensors, labels=None))


@pytest.mark.parametrize("num_negatives", [0, 1, 3])
@pytest.mark.parametrize(
    "st_options, gemb_options",
    [
        ({}, {}),
        (
            dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
            dict(symmetric=True),
        ),
        (
            dict(directions=("query_to_doc", "query_to_query"), partition_mode="joint"),
            dict(query_query_negatives=True),
        ),
    ],
    ids=["in_batch", "symmetric", "query_query"],
)
def test_multiple_negatives_ranking_loss(num_negatives, st_options, gemb_options):
    columns = random_columns(seed=num_negatives, num_negatives=num_negatives)
    config = ContrastiveLossConfig(
        temperature=TEMPERATURE, use_other_hard_negatives=True, **gemb_options
    )
    expected = st_value_from_embeddings(mnrl(**st_options), columns)
    np.testing.assert_allclose(gemb_value(columns, config), expected, rtol=1e-6)


@pytest.mark.parametrize("num_negatives", [0, 2])
def test_matryoshka_loss(num_negatives):
    columns = random_columns(seed=10 + num_negatives, num_negatives=num_negatives)
    dims, weights = (4, 8, 16), (0.25, 0.5, 1.0)
    model = fixed_embedding_model(DIM)
    st_loss = st_losses.MatryoshkaLoss(
        model,
        st_losses.MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE),
        matryoshka_dims=list(dims),
        matryoshka_weights=list(weights),
    )
    features = [{"embedding": torch.from_numpy(c)} for c in columns]
    expected = float(st_loss(features, labels=None))
    config = ContrastiveLossConfig(
        temperature=TEMPERATURE,
        use_other_hard_negatives=True,
        matryoshka_dims=dims,
        matryoshka_weights=weights,
    )
    np.testing.assert_allclose(gemb_value(columns, config), expected, rtol=1e-6)


def test_own_hard_negatives_differ_from_mnrl():
    """gemb's default (each query against its own negatives only) is not MNRL's choice."""
    columns = random_columns(seed=3, num_negatives=2)
    expected = st_value_from_embeddings(mnrl(), columns)
    own_only = gemb_value(columns, ContrastiveLossConfig(temperature=TEMPERATURE))
    assert own_only < expected - 1e-3  # fewer candidates, smaller partition function
