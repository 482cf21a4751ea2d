"""Noise-contrastive estimation over the global batch (docs/recipe.md, "Loss").

For query i the candidates form one row of logits, s(x, y) = cos(x, y) / tau:

    [ p_0 .. p_{B-1} | hard negatives | (optional) q_0 .. q_{B-1} ]

and the loss of the row is the cross-entropy of picking p_i among the row's valid candidates.
The hard-negative block is either the query's own k negatives (B x k) or, with
`use_other_hard_negatives`, every negative of the batch (B x B*k).

Which candidates are valid (the "duplicate mask") is decided from token hashes the data pipeline
carries as features, never from embeddings, because two different texts can embed identically
early in training and two identical texts must always count as the same text:

  * p_j (j != i) is dropped when its text equals p_i's (hash_p[j] == hash_p[i]) or when its query
    equals q_i's (hash_q[j] == hash_q[i]): either way p_j is a correct answer for q_i, so
    pushing q_i away from it would teach the model something false. Classification-style tasks,
    whose positives are a handful of label strings, rely on this.
  * a hard negative n (own or another example's) is dropped when it is missing (negative_mask) or
    when its text equals p_i's: a "negative" that is the positive is a false negative. Another
    example's hard negative is NOT dropped just because that example has the same query: it is
    a negative for that very query text.
  * q_j (j != i, query-query option) is dropped when its text equals q_i's.
  * the positive p_i itself is never dropped.

The optional symmetric term scores each positive p_i against all queries (q_j dropped when
hash_q[j] == hash_q[i] or hash_p[j] == hash_p[i]) and the two directions are averaged.

Label smoothing spreads `label_smoothing` of the target mass uniformly over the valid candidates
of the row (the positive included) and keeps the rest on the positive.

The log-sum-exp always runs in float32 (or wider, if the inputs are float64): embeddings are
upcast before the similarity matmul, because bf16 cosines divided by tau ~ 0.02 would lose
the differences between candidates that the loss is about.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp

from gemb.models.heads import l2_normalize

# Rows of logits where a candidate is masked hold -inf; the log-sum-exp ignores them exactly.
_MASKED_LOGIT = -jnp.inf


@dataclasses.dataclass(frozen=True)
class ContrastiveLossConfig:
    """Options of the contrastive objective; the defaults are the Gemini Embedding recipe.

    Attributes:
      temperature: tau in s(x, y) = cos(x, y) / tau; the initial value when learnable.
      learnable_temperature: train log(tau) as a parameter (see `initial_log_temperature`).
      min_temperature, max_temperature: a learnt tau is clipped to this range, so that the
        logits cannot blow up (tau -> 0) or flatten out (tau -> inf).
      use_other_hard_negatives: also use the other examples' hard negatives as negatives.
      mask_duplicates: drop false negatives found through the token hashes (module docstring).
      symmetric: add the document -> query term and average the two directions.
      query_query_negatives: add the other queries of the batch to each query's candidates.
      label_smoothing: target mass spread uniformly over the valid candidates of a row.
      matryoshka_dims: nested prefix sizes the loss is applied to, in any order (stored
        sorted, smallest first, with their weights); empty means the full embedding only.
      matryoshka_weights: one weight per prefix size, in the order of matryoshka_dims as
        given; None means all 1.
    """

    temperature: float = 0.02
    learnable_temperature: bool = False
    min_temperature: float = 1e-3
    max_temperature: float = 1.0
    use_other_hard_negatives: bool = False
    mask_duplicates: bool = True
    symmetric: bool = False
    query_query_negatives: bool = False
    label_smoothing: float = 0.0
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        # gin and YAML hand lists; store tuples so the config stays hashable (jit static arg).
        dims = tuple(int(d) for d in self.matryoshka_dims)
        weights = (None if self.matryoshka_weights is None
                   else tuple(float(w) for w in self.matryoshka_weights))
        if weights is not None and len(weights) != len(dims):
            raise ValueError(
                f"ContrastiveLossConfig.matryoshka_weights has {len(weights)} entries but "
                f"matryoshka_dims has {len(dims)}; give one weight per dim."
            )
        if len(set(dims)) != len(dims):
            raise ValueError(f"ContrastiveLossConfig.matryoshka_dims {dims} repeat a width.")
        # The prefixes are a set of widths (EncoderConfig.matryoshka_dims lists them in any
        # order too); sorted, the largest is last, which the metrics report unsuffixed.
        order = sorted(range(len(dims)), key=dims.__getitem__)
        object.__setattr__(self, "matryoshka_dims", tuple(dims[i] for i in order))
        if weights is not None:
            object.__setattr__(self, "matryoshka_weights", tuple(weights[i] for i in order))
        if not self.temperature > 0:
            raise ValueError(
                f"ContrastiveLossConfig.temperature must be > 0, got {self.temperature}; "
                "typical values are 0.01-0.05."
            )
        if not 0 < self.min_temperature <= self.max_temperature:
            raise ValueError(
                "ContrastiveLossConfig needs 0 < min_temperature <= max_temperature, got "
                f"min_temperature={self.min_temperature}, max_temperature={self.max_temperature}."
            )
        if self.learnable_temperature and not (
            self.min_temperature <= self.temperature <= self.max_temperature
        ):
            raise ValueError(
                f"ContrastiveLossConfig.temperature={self.temperature} lies outside "
                f"[min_temperature, max_temperature]=[{self.min_temperature}, "
                f"{self.max_temperature}]; a learnable temperature would start clipped. "
                "Widen the range or change the temperature."
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                "ContrastiveLossConfig.label_smoothing must be in [0, 1), got "
                f"{self.label_smoothing}."
            )
        dims = self.matryoshka_dims
        if any(d <= 0 for d in dims):
            raise ValueError(
                f"ContrastiveLossConfig.matryoshka_dims must be positive, got {dims}."
            )
        if self.matryoshka_weights is not None:
            if any(w < 0 for w in self.matryoshka_weights):
                raise ValueError(
                    "ContrastiveLossConfig.matryoshka_weights must be >= 0, got "
                    f"{self.matryoshka_weights}."
                )


def initial_log_temperature(config: ContrastiveLossConfig) -> jax.Array:
    """The starting value of the learnable log(tau) parameter (a float32 scalar)."""
    return jnp.asarray(math.log(config.temperature), jnp.float32)


def effective_temperature(
    config: ContrastiveLossConfig, log_temperature: jax.Array | None = None
) -> jax.Array:
    """tau used by the loss: fixed, or exp(log_temperature) clipped to the configured range.

    Learning log(tau) rather than tau keeps the parameter unconstrained and makes its gradient
    scale-free; clipping (rather than a penalty) bounds tau exactly.
    """
    if not config.learnable_temperature:
        if log_temperature is not None:
            raise ValueError(
                "log_temperature was given but ContrastiveLossConfig.learnable_temperature is "
                "False; drop the argument or set learnable_temperature=True."
            )
        return jnp.asarray(config.temperature, jnp.float32)
    if log_temperature is None:
        raise ValueError(
            "ContrastiveLossConfig.learnable_temperature is True, so the loss needs "
            "log_temperature (start it at initial_log_temperature(config))."
        )
    return jnp.clip(jnp.exp(log_temperature), config.min_temperature, config.max_temperature)


def _loss_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when an input already is (x64 reference tests)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays if a is not None))


def _check_shapes(
    query, positive, negatives, negative_mask, query_hash, positive_hash, negative_hash
):
    if query.ndim != 2 or positive.shape != query.shape:
        raise ValueError(
            f"query and positive embeddings must both be [batch, dim]; got query {query.shape} "
            f"and positive {positive.shape}. Pass one row per example."
        )
    batch, dim = query.shape
    if negatives is not None:
        if negatives.ndim != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim:
            raise ValueError(
                f"negatives must be [batch, num_negatives, dim] = [{batch}, k, {dim}], got "
                f"{negatives.shape}. Use shape [{batch}, 0, {dim}] or None for no hard negatives."
            )
        expected_mask = negatives.shape[:2]
        if negative_mask is not None and negative_mask.shape != expected_mask:
            raise ValueError(
                f"negative_mask must be [batch, num_negatives] = {expected_mask} to match "
                f"negatives {negatives.shape}, got {negative_mask.shape}."
            )
        if negative_hash is not None and negative_hash.shape != expected_mask:
            raise ValueError(
                f"negative_hash must be [batch, num_negatives] = {expected_mask} to match "
                f"negatives {negatives.shape}, got {negative_hash.shape}."
            )
    elif negative_mask is not None or negative_hash is not None:
        raise ValueError(
            "negative_mask / negative_hash were given without negatives; pass the negative "
            "embeddings too, or drop the mask and hashes."
        )
    for name, value in (("query_hash", query_hash), ("positive_hash", positive_hash)):
        if value is not None and value.shape != (batch,):
            raise ValueError(f"{name} must be [batch] = [{batch}], got {value.shape}.")


def _masked_cross_entropy(logits, valid, positive_column, label_smoothing):
    """Per-row cross-entropy of `positive_column` among the valid logits.

    Returns (loss [rows], argmax hits [rows]). Written as lse - sum(target * logit) so that
    masked entries (-inf) never meet a zero target (0 * -inf = nan).
    """
    masked = jnp.where(valid, logits, _MASKED_LOGIT)
    log_partition = jax.nn.logsumexp(masked, axis=-1)
    positive_logit = jnp.take_along_axis(logits, positive_column[:, None], axis=-1)[:, 0]
    target_logit = positive_logit
    if label_smoothing > 0:
        num_valid = jnp.sum(valid, axis=-1)
        mean_valid_logit = jnp.sum(jnp.where(valid, logits, 0.0), axis=-1) / num_valid
        target_logit = (1.0 - label_smoothing) * positive_logit + label_smoothing * mean_valid_logit
    hits = jnp.argmax(masked, axis=-1) == positive_column
    return log_partition - target_logit, hits


def contrastive_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
    query_hash: jax.Array | None = None,
    positive_hash: jax.Array | None = None,
    negative_hash: jax.Array | None = None,
    *,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
    log_temperature: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NCE loss of one embedding size over the (global) batch.

    Args:
      query, positive: [B, E] embeddings (any scale: they are L2-normalised here).
      negatives: [B, K, E] hard negatives, or None. K may be 0.
      negative_mask: [B, K] bool, True where the negative exists; None means all exist.
      query_hash, positive_hash: [B] int token hashes of the texts; negative_hash: [B, K].
        Missing hashes switch off the part of the duplicate mask that needs them.
      config: the options (a static, hashable dataclass).
      log_temperature: the learnt log(tau) scalar when config.learnable_temperature.

    Returns:
      (mean loss over the batch, metrics): accuracy (in-batch top-1 of the query -> document
      row), positive_similarity (mean cos(q_i, p_i)), hardest_negative_similarity (mean over
      rows of the largest cosine among the row's valid negatives), temperature.
    """
    _check_shapes(
        query, positive, negatives, negative_mask, query_hash, positive_hash, negative_hash
    )
    if negatives is not None and negatives.shape[1] == 0:
        negatives = negative_mask = negative_hash = None
    dtype = _loss_dtype(query, positive, negatives)
    batch = query.shape[0]
    temperature = effective_temperature(config, log_temperature).astype(dtype)

    q = l2_normalize(query.astype(dtype))
    p = l2_normalize(positive.astype(dtype))
    rows = jnp.arange(batch)
    not_self = rows[:, None] != rows[None, :]
    mask_duplicates = config.mask_duplicates

    def same(hash_a, hash_b):
        """[B, B] True where row i's hash_a equals column j's hash_b (False without hashes)."""
        if not mask_duplicates or hash_a is None or hash_b is None:
            return jnp.zeros((batch, batch), bool)
        return hash_a[:, None] == hash_b[None, :]

    same_query = same(query_hash, query_hash)
    same_positive = same(positive_hash, positive_hash)

    # Block 1: every positive of the batch; p_i sits at column i.
    cosines = [q @ p.T]
    valid = [~not_self | ~(same_query | same_positive)]
    is_negative = [not_self]

    # Block 2: hard negatives, the query's own or all of the batch's.
    if negatives is not None:
        n = l2_normalize(negatives.astype(dtype))
        k = n.shape[1]
        if negative_mask is None:
            exists = jnp.ones(n.shape[:2], bool)
        else:
            exists = negative_mask.astype(bool)
        if config.use_other_hard_negatives:
            cosines.append(jnp.einsum("ie,jke->ijk", q, n).reshape(batch, batch * k))
            negative_valid = jnp.broadcast_to(exists[None], (batch, batch, k))
            if mask_duplicates and negative_hash is not None and positive_hash is not None:
                negative_valid &= negative_hash[None, :, :] != positive_hash[:, None, None]
            valid.append(negative_valid.reshape(batch, batch * k))
        else:
            cosines.append(jnp.einsum("ie,ike->ik", q, n))
            negative_valid = exists
            if mask_duplicates and negative_hash is not None and positive_hash is not None:
                negative_valid &= negative_hash != positive_hash[:, None]
            valid.append(negative_valid)
        is_negative.append(jnp.ones_like(valid[-1]))

    # Block 3: the other queries (Qwen3 / GTE style same-tower negatives), never q_i itself.
    if config.query_query_negatives:
        cosines.append(q @ q.T)
        valid.append(not_self & ~same_query)
        is_negative.append(not_self)

    cosine = jnp.concatenate(cosines, axis=1)
    valid = jnp.concatenate(valid, axis=1)
    is_negative = jnp.concatenate(is_negative, axis=1)
    logits = cosine / temperature
    row_loss, hits = _masked_cross_entropy(logits, valid, rows, config.label_smoothing)
    loss = jnp.mean(row_loss)

    if config.symmetric:
        # Document -> query: p_i against every query; q_j is a false negative when it is the
        # same text as q_i or was paired with the same positive text.
        reverse_logits = (p @ q.T) / temperature
        reverse_valid = ~not_self | ~(same_query | same_positive)
        reverse_loss, _ = _masked_cross_entropy(
            reverse_logits, reverse_valid, rows, config.label_smoothing
        )
        loss = 0.5 * (loss + jnp.mean(reverse_loss))

    negative_cosine = jnp.where(valid & is_negative, cosine, -jnp.inf)
    hardest = jnp.max(negative_cosine, axis=1)
    has_negative = jnp.isfinite(hardest)
    metrics = {
        "accuracy": jnp.mean(hits.astype(jnp.float32)),
        "positive_similarity": jnp.mean(jnp.diagonal(cosine[:, :batch])).astype(jnp.float32),
        "hardest_negative_similarity": (
            jnp.sum(jnp.where(has_negative, hardest, 0.0))
            / jnp.maximum(jnp.sum(has_negative), 1)
        ).astype(jnp.float32),
        "temperature": temperature.astype(jnp.float32),
    }
    return loss, metrics


def contrastive_loss_from_features(
    embeddings: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    *,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
    log_temperature: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`contrastive_loss` on the feature dicts the encoder and the data pipeline produce.

    embeddings: 'query' [B, E], 'positive' [B, E], optional 'negatives' [B, K, E].
    batch: optional 'negative_mask' [B, K], 'query_hash' [B], 'positive_hash' [B],
      'negative_hash' [B, K]; other keys (token ids, ...) are ignored.
    """
    missing = [key for key in ("query", "positive") if key not in embeddings]
    if missing:
        raise ValueError(
            f"embeddings lack {missing}; the embed function must return a dict with 'query', "
            "'positive' and optionally 'negatives'."
        )
    return contrastive_loss(
        embeddings["query"],
        embeddings["positive"],
        embeddings.get("negatives"),
        batch.get("negative_mask"),
        batch.get("query_hash"),
        batch.get("positive_hash"),
        batch.get("negative_hash"),
        config=config,
        log_temperature=log_temperature,
    )
