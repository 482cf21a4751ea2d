"""Token ids of a batch -> the model's input arrays, padded or packed, with static shapes.

A batch holds B examples of one task; each has a query, a positive and K hard-negative slots
(some possibly empty). The converter writes them in exactly the layout the train step consumes
(docs/design.md, "The path of one batch"), so no later stage reshapes or re-plans them.

Padded layout (FeatureConverterConfig.pack=False): one example per row, example-major, so every
feature has the batch as its leading axis and the step can cut it into gradient-cache chunks
or microbatches.

  query_tokens / _segment_ids / _positions          int32 [B, Lq]
  positive_tokens / _segment_ids / _positions       int32 [B, Ld]
  negatives_tokens / _segment_ids / _positions      int32 [B, K, Ld]   (K > 0 only)
  negative_mask                                     bool  [B, K]       (K > 0 only)
  query_hash, positive_hash                         int32 [B]
  negative_hash                                     int32 [B, K]       (K > 0 only)

Packed layout (pack=True): each role is its own block of R token rows holding up to S examples
each (first-fit decreasing), plus where each example's embedding lands in the encoder's
[R, S, E] output:

  {role}_tokens / _segment_ids / _positions  int32 [R, L]
  {role}_segment_mask  bool  [R, S]  True where a (row, segment) slot holds an example; its
                                     shape gives the encoder's static num_segments = S
  query_slot, positive_slot  int32 [B]   flat index row * S + (segment - 1) of each example,
                       row counted in the GLOBAL batch (rows of the hosts before this one first)
  negative_slot        int32 [B, K]  the same for negatives (0 where negative_mask is False)
  negative_mask, *_hash as above

with {role} in (query, positive, negatives). Token rows: BOS first (bos_id), EOS last (eos_id)
if set, pad_id on padding; segment ids 1..S for the examples of a row and 0 on padding;
positions restart at 0 in every segment. The hashes are of the final token ids (the loss's
duplicate mask). A batch without hard negatives (K = 0, or a packed batch in which no example
has one) carries no negatives_* / negative_* features at all, so pair and triplet tasks compile
to two programs.

Row lengths come from a few buckets (`FeatureConverterConfig.buckets`): the smallest bucket
holding the role's longest example (padded), or among a few at or above it the one that needs
the fewest token positions (packed); packed row counts are rounded up to a row bucket.

Pack groups (packed only; `FeatureConverter(pack_groups=n)`, the train step's microbatches):
example b of a host's batch belongs to group b % n, and each group is packed into rows of its
own, group m's j-th row at row j * n + m, every group with the same number of rows. With
B_host a multiple of n, example b's global index is congruent to b (mod n) and so is its row's
global index, so the step's strided split (gemb.losses.split_rows) of examples and rows hands
microbatch m exactly its examples and their rows. Slots still count rows of the whole global
batch (a grouped batch is a valid full batch); the microbatched step renumbers them
(EmbeddingModel.split_microbatches).

Texts are cut to fit here, and only here: the task pipeline tokenises without trimming, so the
one place that knows how many special tokens a row carries decides how much text fits.

Multi-host: shapes depend on the batch only through the layout (`BatchPlan.layout`). All hosts
must build one layout, the elementwise max of every host's (gemb.data.batching does this with
process_allgather), and pass it to `convert`; a single host lets `convert` use its own plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np

ROLES = ("query", "positive", "negatives")

# Gemma 3's special tokens (the embedding convention is BOS + ids, no EOS).
GEMMA_BOS_ID = 2
GEMMA_EOS_ID = 1
GEMMA_PAD_ID = 0


@dataclasses.dataclass
class RoleTokens:
    """Token ids of n texts: concatenated `values` and per-text `lengths` (0 = absent)."""

    values: np.ndarray  # int32 [sum(lengths)]
    lengths: np.ndarray  # int64 [n]

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> "RoleTokens":
        lengths = np.array([len(s) for s in sequences], np.int64)
        values = np.concatenate([np.asarray(s, np.int32) for s in sequences]) if len(sequences) else np.zeros(0, np.int32)
        return cls(values.astype(np.int32, copy=False), lengths)

    def sequences(self) -> list[np.ndarray]:
        return np.split(self.values, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []


@dataclasses.dataclass
class TokenBatch:
    """B examples of one task as token ids: the batcher's output, the converter's input."""

    query: RoleTokens  # n = B
    positive: RoleTokens  # n = B
    negatives: RoleTokens  # n = B * K, example b's slots at b*K .. b*K+K-1
    num_negatives: np.ndarray  # int32 [B]: used leading slots of each example
    task: str = ""
    example_ids: Optional[np.ndarray] = None  # uint64 [B], when the source has ids (prepared)

    @property
    def batch_size(self) -> int:
        return len(self.query.lengths)

    @property
    def negatives_per_example(self) -> int:
        return len(self.negatives.lengths) // max(self.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class FeatureConverterConfig:
    """How token ids become model rows.

    Attributes:
      query_length / document_length: most tokens of a query / document row entry, special
        tokens included (longer texts are cut).
      pack: pack several examples per row (segment ids) instead of one example per row.
      length_buckets: allowed row lengths; None = powers of two from min_length up to the
        role's maximum (plus the maximum itself).
      min_length: the smallest automatic bucket.
      segments_per_row: S in packed mode.
      row_buckets_per_octave: packed row counts are rounded up so that at most this many
        distinct counts fall in each power-of-two range (8: at most 12.5% padding rows).
      bos_id / eos_id: prepended / appended when not None.
      pad_id: token id on padding.
      num_negatives: pad (or cut) every task's K to this; None keeps each task's own K.
    """

    query_length: int = 512
    document_length: int = 512
    pack: bool = False
    length_buckets: Optional[tuple[int, ...]] = None
    min_length: int = 16
    segments_per_row: int = 16
    row_buckets_per_octave: int = 8
    bos_id: Optional[int] = GEMMA_BOS_ID
    eos_id: Optional[int] = None
    pad_id: int = GEMMA_PAD_ID
    num_negatives: Optional[int] = None

    def __post_init__(self):
        if self.length_buckets is not None:
            object.__setattr__(self, "length_buckets", tuple(sorted(int(b) for b in self.length_buckets)))
        specials = self.num_special_tokens
        for name in ("query_length", "document_length"):
            if getattr(self, name) <= specials:
                raise ValueError(f"{name}={getattr(self, name)} leaves no room for text after {specials} special tokens")
        if self.segments_per_row < 1 or self.row_buckets_per_octave < 1:
            raise ValueError("segments_per_row and row_buckets_per_octave must be >= 1")

    @property
    def num_special_tokens(self) -> int:
        return int(self.bos_id is not None) + int(self.eos_id is not None)

    def max_length(self, role: str) -> int:
        return self.query_length if role == "query" else self.document_length

    def buckets(self, role: str) -> tuple[int, ...]:
        maximum = self.max_length(role)
        if self.length_buckets is not None:
            chosen = tuple(b for b in self.length_buckets if b < maximum) + (maximum,)
            return chosen
        out = []
        length = self.min_length
        while length < maximum:
            out.append(length)
            length *= 2
        return tuple(out) + (maximum,)


def _bucket(value: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    return buckets[-1]


def round_up_rows(rows: int, row_multiple: int, per_octave: int) -> int:
    """Row count bucket: a multiple of row_multiple, few distinct values per power of two."""
    rows = max(rows, 1)
    units = math.ceil(rows / row_multiple)
    step = max(1, 2 ** max(0, units.bit_length() - 1 - int(math.log2(per_octave))))
    return int(math.ceil(units / step) * step * row_multiple)


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Offset of each text in the concatenated values."""
    return (np.cumsum(lengths) - lengths).astype(np.int64)


_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the output (x is uint64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_hashes(tokens: RoleTokens) -> np.ndarray:
    """int32 hash of each text's token ids; 0 for absent (length 0) texts.

    Equal id sequences always hash equal; unequal ones collide with probability ~2^-32, which
    at worst masks one in-batch negative. Vectorised: a polynomial hash mod 2^64 per text.
    """
    lengths = tokens.lengths
    count = len(lengths)
    if count == 0:
        return np.zeros(0, np.int32)
    starts = _starts(lengths)
    positions = np.arange(len(tokens.values), dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        powers = _mix64(positions.astype(np.uint64) + np.uint64(1))
        terms = (tokens.values.astype(np.int64).astype(np.uint64) + np.uint64(1)) * powers
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(terms, dtype=np.uint64)])
        ends = starts + lengths
        sums = prefix[ends] - prefix[starts]
        hashed = _mix64(sums ^ (lengths.astype(np.uint64) * _HASH_BASE))
    folded = (hashed ^ (hashed >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    result = folded.astype(np.uint32).view(np.int32).copy()
    result[lengths == 0] = 0
    return result


@dataclasses.dataclass
class BatchPlan:
    """A batch made ready for `FeatureConverter.convert`: every role's final token ids (cut,
    with special tokens) and where each text goes. `layout` is what hosts agree on."""

    batch_size: int
    num_negatives: int  # K, the negative slots per example
    roles: dict[str, RoleTokens]
    placements: dict[str, tuple[dict[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]]]

    @property
    def layout(self) -> dict[str, int]:
        """This batch's own layout as flat ints {role_rows, role_length, role_segments}."""
        return {f"{role}_{key}": value for role, (own, _) in self.placements.items()
                for key, value in own.items()}


class FeatureConverter:
    """Turns `TokenBatch`es into model features (see the module docstring).

    row_multiple: each pack group's packed row count is a multiple of this (the data-parallel
    devices of this host, times the gradient-cache chunks of a microbatch: gemb.train.trainer.
    packed_row_multiple), so every device gets whole rows of every chunk. It is a property of
    the run's mesh and step, not of the configuration, and is ignored in the padded layout (its
    rows are the examples).
    shard_index: this host's block of the global batch (its rows follow shard_index equal
    blocks of the other hosts). Packed slots index the GLOBAL rows, so they are offset by the
    rows before this host's block; hosts must then convert with one agreed layout.
    pack_groups: pack examples b % pack_groups == m into rows of their own (the module
    docstring): the train step's microbatches. Ignored in the padded layout.
    """

    def __init__(self, config: FeatureConverterConfig = FeatureConverterConfig(),
                 row_multiple: int = 1, shard_index: int = 0, pack_groups: int = 1):
        if row_multiple < 1 or shard_index < 0 or pack_groups < 1:
            raise ValueError(f"row_multiple and pack_groups must be >= 1 and shard_index >= 0, "
                             f"got {row_multiple}, {pack_groups} and {shard_index}")
        self.config = config
        self.row_multiple = row_multiple
        self.shard_index = shard_index
        self.pack_groups = pack_groups

    # -- special tokens and trimming ----------------------------------------------------------

    def _finalize(self, tokens: RoleTokens, role: str) -> RoleTokens:
        """Cuts each text to fit, then adds BOS/EOS to every present text (length > 0)."""
        cfg = self.config
        room = cfg.max_length(role) - cfg.num_special_tokens
        lengths = tokens.lengths
        present = lengths > 0
        kept = np.minimum(lengths, room)
        starts = _starts(lengths)
        new_lengths = np.where(present, kept + cfg.num_special_tokens, 0).astype(np.int64)
        new_starts = _starts(new_lengths)
        out = np.empty(int(new_lengths.sum()), np.int32)
        if cfg.bos_id is not None:
            out[new_starts[present]] = cfg.bos_id
        if cfg.eos_id is not None:
            out[(new_starts + new_lengths - 1)[present]] = cfg.eos_id
        offset = int(cfg.bos_id is not None)
        # Every kept text token: its source index and its destination index.
        within = np.arange(int(kept.sum()), dtype=np.int64) - np.repeat(_starts(kept), kept)
        source = np.repeat(starts, kept) + within
        dest = np.repeat(new_starts + offset, kept) + within
        out[dest] = tokens.values[source]
        return RoleTokens(out, new_lengths)

    def _pad_negatives(self, batch: TokenBatch) -> RoleTokens:
        """Negatives with K = config.num_negatives slots per example (if set); unused slots empty."""
        k_have = batch.negatives_per_example
        k_want = k_have if self.config.num_negatives is None else self.config.num_negatives
        lengths = batch.negatives.lengths.reshape(batch.batch_size, k_have)
        in_use = np.arange(k_have)[None, :] < batch.num_negatives[:, None]
        if k_want == k_have and not np.any(lengths[~in_use]):
            return batch.negatives
        # Slots past num_negatives are empty by contract; making them so keeps mask and rows in step.
        sequences = batch.negatives.sequences()
        empty = np.zeros(0, np.int32)
        return RoleTokens.from_lists([
            sequences[b * k_have + k] if k < k_have and in_use[b, k] else empty
            for b in range(batch.batch_size)
            for k in range(k_want)
        ])

    # -- layout -------------------------------------------------------------------------------

    def _pack(self, lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """First-fit decreasing: (row, start column, segment id) per text, and rows used.

        Texts are placed longest first (ties in index order), each into the first row with room
        for it and fewer than S segments. Texts of equal length are placed together: first fit
        fills each row that still takes one of them to the brim before moving on, so a whole
        group is a cumulative sum over the rows' capacities (vectorised, ~50x faster than a
        loop over texts). Absent texts (length 0) get row -1.
        """
        segments = self.config.segments_per_row
        count = len(lengths)
        row = np.full(count, -1, np.int64)
        start = np.zeros(count, np.int64)
        segment = np.zeros(count, np.int64)
        present = np.flatnonzero(lengths > 0)
        if len(present) == 0:
            return row, start, segment, 0
        order = present[np.lexsort((present, -lengths[present]))]
        group_starts = np.flatnonzero(np.diff(lengths[order])) + 1
        free = np.zeros(0, np.int64)
        used = np.zeros(0, np.int64)
        for group in np.split(order, group_starts):
            n = int(lengths[group[0]])
            if n > capacity:
                raise ValueError(f"a text of {n} tokens does not fit a packed row of {capacity}")
            # Existing rows, in order, each take as many as fit.
            room = np.maximum(np.minimum(free // n, segments - used), 0)
            filled = np.cumsum(room)
            on_existing = min(len(group), int(filled[-1]) if len(filled) else 0)
            index = np.arange(on_existing)
            r = np.searchsorted(filled, index, side="right")
            nth = index - (filled[r] - room[r])
            row[group[:on_existing]] = r
            start[group[:on_existing]] = capacity - free[r] + nth * n
            segment[group[:on_existing]] = used[r] + nth + 1
            added = np.bincount(r, minlength=len(free))
            free = free - added * n
            used = used + added
            # The rest open new rows, each filled before the next is opened.
            rest = len(group) - on_existing
            if rest:
                per_row = min(capacity // n, segments)
                index = np.arange(rest)
                new_row, nth = np.divmod(index, per_row)
                row[group[on_existing:]] = len(free) + new_row
                start[group[on_existing:]] = nth * n
                segment[group[on_existing:]] = nth + 1
                counts = np.bincount(new_row)
                free = np.concatenate([free, capacity - counts * n])
                used = np.concatenate([used, counts])
        return row, start, segment, len(free)

    def _pack_groups(self, lengths: np.ndarray, group: np.ndarray, capacity: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """`_pack` of each group's texts on its own: (row, start, segment) per text with group
        m's j-th row at row j * pack_groups + m, and the most rows a group needs."""
        groups = self.pack_groups
        if groups == 1:
            return self._pack(lengths, capacity)
        row = np.full(len(lengths), -1, np.int64)
        start = np.zeros(len(lengths), np.int64)
        segment = np.zeros(len(lengths), np.int64)
        rows_per_group = 0
        for m in range(groups):
            members = np.flatnonzero(group == m)
            own_row, own_start, own_segment, used = self._pack(lengths[members], capacity)
            row[members] = np.where(own_row >= 0, own_row * groups + m, -1)
            start[members] = own_start
            segment[members] = own_segment
            rows_per_group = max(rows_per_group, used)
        return row, start, segment, rows_per_group

    def _role_placement(self, tokens: RoleTokens, role: str, texts_per_example: int
                        ) -> tuple[dict[str, int], tuple]:
        """The role's own layout and where each text goes: (row, start column, segment id)."""
        cfg = self.config
        count = len(tokens.lengths)
        longest = int(tokens.lengths.max()) if count else 0
        length = _bucket(max(longest, 1), cfg.buckets(role))
        if not cfg.pack:
            placement = (
                np.arange(count, dtype=np.int64),
                np.zeros(count, np.int64),
                (tokens.lengths > 0).astype(np.int64),
            )
            return {"rows": count, "length": length, "segments": 1}, placement
        # Rows just long enough for the longest text fit one short text each when the texts are
        # of similar length (label names, captions), so also try longer rows and keep the
        # layout with the fewest token positions (the shorter rows on a tie: attention cost
        # grows with the square of the row length).
        present = tokens.lengths[tokens.lengths > 0]
        mean = float(present.mean()) if len(present) else 1.0
        buckets = cfg.buckets(role)
        candidates = sorted({
            length,
            _bucket(min(2 * max(longest, 1), buckets[-1]), buckets),
            _bucket(min(int(cfg.segments_per_row * mean), buckets[-1]), buckets),
        })
        # Text i belongs to example i // texts_per_example, and so to its pack group.
        group = (np.arange(count) // max(texts_per_example, 1)) % self.pack_groups
        best = None
        for candidate in candidates:
            row, start, segment, rows = self._pack_groups(tokens.lengths, group, candidate)
            if rows:
                rows = self.pack_groups * round_up_rows(rows, self.row_multiple,
                                                        cfg.row_buckets_per_octave)
            if best is None or rows * candidate < best[0]["rows"] * best[0]["length"]:
                best = ({"rows": rows, "length": candidate, "segments": cfg.segments_per_row}, (row, start, segment))
        return best

    def plan(self, batch: TokenBatch) -> BatchPlan:
        """Cuts, adds special tokens and places every text, once; `convert` takes the result."""
        if self.config.pack and batch.batch_size % self.pack_groups:
            raise ValueError(
                f"a batch of {batch.batch_size} examples on this host cannot be packed in "
                f"pack_groups={self.pack_groups} (the step's microbatches): each host's batch "
                f"must be a multiple of {self.pack_groups}; use a global batch size that is a "
                "multiple of microbatches x hosts.")
        roles = {
            "query": self._finalize(batch.query, "query"),
            "positive": self._finalize(batch.positive, "positive"),
            "negatives": self._finalize(self._pad_negatives(batch), "negatives"),
        }
        k = len(roles["negatives"].lengths) // max(batch.batch_size, 1)
        placements = {role: self._role_placement(tokens, role, k if role == "negatives" else 1)
                      for role, tokens in roles.items()}
        return BatchPlan(batch.batch_size, k, roles, placements)

    # -- conversion ---------------------------------------------------------------------------

    def convert(self, batch: TokenBatch | BatchPlan,
                layout: Optional[Mapping[str, int]] = None) -> dict[str, np.ndarray]:
        """Model features of a batch (or of its plan), shaped by `layout` (default: the batch's
        own plan; a larger agreed layout only adds padding)."""
        plan = batch if isinstance(batch, BatchPlan) else self.plan(batch)
        if layout is None:
            if self.shard_index and self.config.pack:
                raise ValueError("a packed batch of shard_index > 0 needs the layout every host "
                                 "agreed on (agree_across_processes): its slots count the rows "
                                 "of the blocks before it.")
            layout = plan.layout
        batch_size, k = plan.batch_size, plan.num_negatives
        features: dict[str, np.ndarray] = {}
        slots: dict[str, np.ndarray] = {}
        for role, tokens in plan.roles.items():
            rows, length, segments = (int(layout[f"{role}_{key}"]) for key in ("rows", "length", "segments"))
            mine, (row, start, segment) = plan.placements[role]
            if rows < mine["rows"] or length < mine["length"] or segments < mine["segments"]:
                raise ValueError(
                    f"layout {dict(layout)} is too small for this batch's {role} ({mine}); pass the "
                    "elementwise max of every host's plan layout."
                )
            if self.config.pack and rows % self.pack_groups:
                raise ValueError(
                    f"layout {dict(layout)} gives {role} {rows} rows, not a multiple of "
                    f"pack_groups={self.pack_groups}; every host must plan with the same "
                    "pack_groups (the layout's rows are pack_groups x rows per group).")
            present = tokens.lengths > 0
            token_ids = np.full((rows, length), self.config.pad_id, np.int32)
            segment_ids = np.zeros((rows, length), np.int32)
            positions = np.zeros((rows, length), np.int32)
            lengths = tokens.lengths
            text_starts = _starts(lengths)
            within = np.arange(len(tokens.values), dtype=np.int64) - np.repeat(text_starts, lengths)
            token_rows = np.repeat(row, lengths)
            token_cols = np.repeat(start, lengths) + within
            token_ids[token_rows, token_cols] = tokens.values
            segment_ids[token_rows, token_cols] = np.repeat(segment, lengths)
            positions[token_rows, token_cols] = within
            features[f"{role}_tokens"] = token_ids
            features[f"{role}_segment_ids"] = segment_ids
            features[f"{role}_positions"] = positions
            if self.config.pack:
                segment_mask = np.zeros((rows, segments), bool)
                segment_mask[row[present], segment[present] - 1] = True
                features[f"{role}_segment_mask"] = segment_mask
                global_row = row + self.shard_index * rows  # rows of the blocks before ours
                slots[role] = np.where(present, global_row * segments + segment - 1,
                                       0).astype(np.int32)
        negative_mask = (plan.roles["negatives"].lengths > 0).reshape(batch_size, k)
        features["query_hash"] = token_hashes(plan.roles["query"])
        features["positive_hash"] = token_hashes(plan.roles["positive"])
        features["negative_mask"] = negative_mask
        features["negative_hash"] = token_hashes(plan.roles["negatives"]).reshape(batch_size, k)
        if self.config.pack:
            features["query_slot"] = slots["query"]
            features["positive_slot"] = slots["positive"]
            features["negative_slot"] = slots["negatives"].reshape(batch_size, k)
            has_negatives = features["negatives_tokens"].shape[0] > 0
        else:
            # Row b * K + k of the negatives block is example b's k-th slot: [B, K, L].
            for name in ("tokens", "segment_ids", "positions"):
                value = features[f"negatives_{name}"]
                features[f"negatives_{name}"] = value.reshape(batch_size, k, value.shape[-1])
            has_negatives = k > 0
        if not has_negatives:
            for key in [key for key in features if key.startswith("negative")]:
                del features[key]
        return features


def full_length_features(config: FeatureConverterConfig, batch_size: int,
                         num_negatives: int = 0, row_multiple: int = 1,
                         pack_groups: int = 1) -> dict[str, np.ndarray]:
    """A batch whose every text fills its row: the largest features `config` makes for that
    batch size and K (what an ahead-of-time compile must fit, e.g. gemb precompile), with a
    FeatureConverter of that row_multiple and pack_groups."""
    def texts(count: int, role: str) -> RoleTokens:
        return RoleTokens.from_lists([[3] * config.max_length(role)] * count)

    batch = TokenBatch(texts(batch_size, "query"), texts(batch_size, "positive"),
                       texts(batch_size * num_negatives, "negatives"),
                       np.full(batch_size, num_negatives, np.int32))
    converter = FeatureConverter(dataclasses.replace(config, num_negatives=num_negatives),
                                 row_multiple=row_multiple, pack_groups=pack_groups)
    return converter.convert(batch)


def agree_across_processes(layout: Mapping[str, int]) -> dict[str, int]:
    """Elementwise max of every JAX process's layout, so all processes build equal shapes."""
    import jax

    if jax.process_count() == 1:
        return dict(layout)
    from jax.experimental import multihost_utils

    keys = sorted(layout)
    values = np.array([layout[k] for k in keys], np.int64)
    gathered = np.asarray(multihost_utils.process_allgather(values))
    return dict(zip(keys, gathered.reshape(-1, len(keys)).max(axis=0).tolist()))


def is_packed(features: Mapping[str, np.ndarray]) -> bool:
    """Which of the two layouts (module docstring) a feature dict is in."""
    return "query_slot" in features


def check_pack_groups(features: Mapping[str, np.ndarray], pack_groups: int) -> None:
    """Raises unless every example of this host's packed batch lies in its pack group's rows
    (example b in a row congruent to b modulo pack_groups: the module docstring), which the
    microbatched step needs. Padded batches and pack_groups=1 always pass."""
    if pack_groups == 1 or not is_packed(features):
        return
    batch_size = len(features["query_hash"])
    fix = (f"convert with FeatureConverter(pack_groups={pack_groups}) (gemb.train.run passes "
           f"DataShard.pack_groups = StepConfig.microbatches to TrainingData.make)")
    if batch_size % pack_groups:
        raise ValueError(f"a packed batch of {batch_size} examples on this host cannot be split "
                         f"into {pack_groups} microbatches; use a global batch size that is a "
                         "multiple of microbatches x hosts.")
    group = np.arange(batch_size) % pack_groups
    for role, slot_name in (("query", "query_slot"), ("positive", "positive_slot"),
                            ("negatives", "negative_slot")):
        if f"{role}_tokens" not in features:
            continue
        rows = features[f"{role}_tokens"].shape[0]
        if rows % pack_groups:
            raise ValueError(f"the packed {role} block has {rows} rows, not a multiple of the "
                             f"{pack_groups} microbatches; {fix}.")
        slots = np.asarray(features[slot_name])
        present = np.ones(slots.shape, bool)
        example_group = group
        if role == "negatives":
            present = np.asarray(features["negative_mask"])
            example_group = group[:, None]
        row = slots // features[f"{role}_segment_mask"].shape[1]
        wrong = np.argwhere(present & (row % pack_groups != example_group))
        if len(wrong):
            b, bad_row = int(wrong[0][0]), int(row[tuple(wrong[0])])
            raise ValueError(
                f"packed batch: example {b}'s {role} lies in row {bad_row}, which microbatch "
                f"{bad_row % pack_groups} holds, not its own microbatch {b % pack_groups} of "
                f"{pack_groups}: each microbatch's examples must be packed into rows of their "
                f"own; {fix}.")


def num_tokens(features: Mapping[str, np.ndarray]) -> int:
    """Non-padding tokens of a batch, over every role (for tokens/s)."""
    return int(sum(np.count_nonzero(features[f"{role}_segment_ids"]) for role in ROLES
                   if f"{role}_segment_ids" in features))


def padding_fraction(features: Mapping[str, np.ndarray]) -> float:
    """Share of token positions, over all roles, that are padding."""
    total = 0
    padding = 0
    for role in ROLES:
        if f"{role}_segment_ids" not in features:
            continue
        segment_ids = features[f"{role}_segment_ids"]
        total += segment_ids.size
        padding += int((segment_ids == 0).sum())
    return padding / total if total else 0.0


def examples_in_features(features: Mapping[str, np.ndarray]) -> dict[str, list[tuple[int, ...]]]:
    """Each example's token ids per role, read back from the features (either layout; for
    tests and checks).

    Returns {"query": [ids of example b], "positive": [...], "negatives": [(ids of example b's
    negatives, in slot order, present ones only)]}.
    """
    batch_size = len(features["query_hash"])
    mask = features.get("negative_mask", np.zeros((batch_size, 0), bool))
    out: dict[str, list] = {}
    for role in ROLES:
        if f"{role}_tokens" not in features:
            out[role] = [()] * batch_size
            continue
        tokens = features[f"{role}_tokens"]
        segment_ids = features[f"{role}_segment_ids"]
        if is_packed(features):
            segments = features[f"{role}_segment_mask"].shape[1]
            slots = features["negative_slot" if role == "negatives" else f"{role}_slot"]
            tokens = tokens.reshape(-1, tokens.shape[-1])
            segment_ids = segment_ids.reshape(-1, segment_ids.shape[-1])
        else:
            segments = 1
            k = mask.shape[1]
            slots = (np.arange(batch_size * k).reshape(batch_size, k) if role == "negatives"
                     else np.arange(batch_size))
            tokens = tokens.reshape(-1, tokens.shape[-1])
            segment_ids = segment_ids.reshape(-1, segment_ids.shape[-1])

        def ids_of(slot: int) -> tuple[int, ...]:
            row, segment = divmod(int(slot), segments)
            return tuple(int(t) for t in tokens[row][segment_ids[row] == segment + 1])

        if role == "negatives":
            out[role] = [tuple(ids_of(s) for s, m in zip(slots[b], mask[b]) if m)
                         for b in range(batch_size)]
        else:
            out[role] = [ids_of(s) for s in slots]
    return out
