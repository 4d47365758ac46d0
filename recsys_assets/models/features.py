"""Batches of the data contract -> TorchRec KeyedJaggedTensors for the Two Tower model.

One KJT carries the features of BOTH towers, always with the same keys in the same order (a sharded
EmbeddingBagCollection fixes its input layout on the first call, and an unsharded one looks every feature up by
name). A tower that is not needed for some rows gets empty bags there: the candidate-only KJT of an item
encoding pass has empty query bags, and the training KJT gives its extra sampled negatives rows with empty
query bags (`stride` = batch + extra negatives).

Keys:
- query tower: ``user_id`` (1 per row; only with `FeatureSpec.use_user_id`), ``history`` (the user's recent
  items, most recent first, 0..max_history per row, mean pooled), the recency feature(s) (``recent_items``: the
  last k items, 0..k per row; or with `recent_slots` ``recent_items_0`` .. ``recent_items_{k-1}``, the item at
  that position, 0..1 per row; none when k = 0), ``attr_<name>`` (1 per row for each user attribute);
- candidate tower: ``item_id`` (1 per row), ``item_categories`` (0..n per row).
``history``, the recency feature(s) and ``item_id`` read ONE item table (see two_tower.embedding_bag_configs).
With the sequence query encoder (`FeatureSpec.query_encoder`), ``history`` and ``item_id`` are read unpooled by
an EmbeddingCollection and come last in the KJT (`FeatureSpec.keys`); there are no recency features.

Id 0 is a real id everywhere: values are selected with masks built from lengths / ``>= 0``, never from the
truthiness of an id. Padding (-1) never reaches a KJT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_assets.data.schema import (
    CATEGORIES,
    HISTORY,
    HISTORY_LEN,
    ITEM,
    PAD_ID,
    USER,
    DatasetMeta,
    DatasetPaths,
    attribute_columns,
)

USER_ID = "user_id"
HISTORY_ITEMS = "history"
RECENT_ITEMS = "recent_items"
ITEM_ID = "item_id"
ITEM_CATEGORIES = "item_categories"
QUERY_ENCODERS = ("bag", "sequence")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Cardinalities and feature names of the two towers (derived from `DatasetMeta`)."""

    num_users: int
    num_items: int
    num_categories: int
    user_attributes: tuple[tuple[str, int], ...]  # (column name "attr_<name>", cardinality), sorted by name
    history_length: int  # H of the MDS rows
    max_history: int  # how many of the most recent history items the model looks at (<= H)
    # The last `recent_items` history items (<= H) as extra query features on the item table: one bag
    # ``recent_items`` (mean pooled) or, with `recent_slots`, one single-item feature per position
    # (``recent_items_0`` = the most recent). Defaults describe models saved before the feature existed.
    recent_items: int = 0
    recent_slots: bool = False
    use_user_id: bool = True  # the query tower reads the user-id table
    # "bag": the history is mean pooled (EmbeddingBagCollection); "sequence": it is read item by item, in order
    # (EmbeddingCollection, unpooled) by causal self-attention. The sequence sees the latest items itself, so
    # it has no recent-item features (recent_items is 0).
    query_encoder: str = "bag"

    def __post_init__(self) -> None:
        if self.query_encoder not in QUERY_ENCODERS:
            raise ValueError(f"query_encoder must be one of {QUERY_ENCODERS}, got {self.query_encoder!r}")
        if self.query_encoder == "sequence" and self.recent_items:
            raise ValueError("the sequence query encoder reads the recent items in order: recent_items must be 0")

    @classmethod
    def from_meta(
        cls,
        meta: DatasetMeta,
        max_history: int | None = None,
        recent_items: int = 0,
        recent_slots: bool = False,
        use_user_id: bool = True,
        query_encoder: str = "bag",
    ) -> FeatureSpec:
        attrs = attribute_columns(meta.user_attribute_cardinalities)
        h = int(meta.history_length)
        m = h if max_history is None else int(max_history)
        if not 0 <= m <= h or not 0 <= recent_items <= h:
            # the training config checks this first (TwoTowerTrainConfig.check_dataset), with the asset's words
            raise ValueError(f"max_history={m} and recent_items={recent_items} must be within [0, history_length={h}]")
        return cls(
            num_users=int(meta.num_users),
            num_items=int(meta.num_items),
            num_categories=int(meta.num_categories),
            user_attributes=tuple(attrs),
            history_length=h,
            max_history=m,
            recent_items=int(recent_items),
            recent_slots=bool(recent_slots),
            use_user_id=bool(use_user_id),
            query_encoder=str(query_encoder),
        )

    @property
    def attribute_keys(self) -> list[str]:
        return [col for col, _ in self.user_attributes]

    @property
    def recent_keys(self) -> list[str]:
        if self.recent_items <= 0:
            return []
        if self.recent_slots:
            return [f"{RECENT_ITEMS}_{j}" for j in range(self.recent_items)]
        return [RECENT_ITEMS]

    @property
    def query_keys(self) -> list[str]:
        return [*([USER_ID] if self.use_user_id else []), HISTORY_ITEMS, *self.recent_keys, *self.attribute_keys]

    @property
    def candidate_keys(self) -> list[str]:
        return [ITEM_ID, ITEM_CATEGORIES]

    @property
    def sequence_keys(self) -> list[str]:
        """The features read unpooled, through the EmbeddingCollection: the history and the candidate item
        (they share the item table). Empty for the bag encoder."""
        return [HISTORY_ITEMS, ITEM_ID] if self.query_encoder == "sequence" else []

    @property
    def keys(self) -> list[str]:
        """Every feature of a KJT, in its order: the EmbeddingBagCollection's features, then the
        EmbeddingCollection's (so that one `split` hands each module its own)."""
        pooled = [k for k in self.query_keys + self.candidate_keys if k not in self.sequence_keys]
        return pooled + self.sequence_keys


class FeatureStore:
    """Side tables the MDS rows do not carry: user attributes and item categories, as dense tensors.

    Attributes:
        user_attrs: int64 [num_users, n_attributes] (columns in `spec.attribute_keys` order; users missing from
            the Parquet get attribute 0).
        cat_indptr, cat_indices: int64 CSR of each item's categories (items missing from the Parquet get none).
    """

    def __init__(
        self, spec: FeatureSpec, user_attrs: torch.Tensor, cat_indptr: torch.Tensor, cat_indices: torch.Tensor
    ):
        if user_attrs.shape != (spec.num_users, len(spec.user_attributes)):
            raise ValueError(f"user_attrs shape {tuple(user_attrs.shape)} does not match the spec")
        if cat_indptr.shape != (spec.num_items + 1,):
            raise ValueError(f"cat_indptr shape {tuple(cat_indptr.shape)} does not match num_items")
        self.spec = spec
        self.user_attrs = user_attrs.long()
        self.cat_indptr = cat_indptr.long()
        self.cat_indices = cat_indices.long()
        self.cat_rows = _padded_rows(self.cat_indptr, self.cat_indices)

    def to(self, device: torch.device) -> FeatureStore:
        return FeatureStore(
            self.spec, self.user_attrs.to(device), self.cat_indptr.to(device), self.cat_indices.to(device)
        )

    @classmethod
    def from_frames(cls, spec: FeatureSpec, user_features, item_features) -> FeatureStore:
        """From pandas frames shaped like the ``user_features`` / ``item_features`` Parquet tables."""
        n_attr = len(spec.user_attributes)
        attrs = np.zeros((spec.num_users, n_attr), dtype=np.int64)
        if n_attr:
            users = user_features[USER].to_numpy(dtype=np.int64)
            _check_range(users, spec.num_users, "user_features.user")
            for j, (col, card) in enumerate(spec.user_attributes):
                if col not in user_features.columns:
                    raise ValueError(f"user_features lacks column {col!r}")
                vals = user_features[col].to_numpy(dtype=np.int64)
                _check_range(vals, card, f"user_features.{col}")
                attrs[users, j] = vals

        lengths = np.zeros(spec.num_items, dtype=np.int64)
        per_item: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * spec.num_items
        items = item_features[ITEM].to_numpy(dtype=np.int64)
        _check_range(items, spec.num_items, "item_features.item")
        for item, cats in zip(items, item_features[CATEGORIES].to_numpy()):
            arr = np.zeros(0, dtype=np.int64) if cats is None else np.asarray(cats, dtype=np.int64)
            arr = arr[arr >= 0]  # tolerate padding; 0 is a real category
            per_item[item] = arr
            lengths[item] = len(arr)
        indptr = np.zeros(spec.num_items + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate(per_item) if spec.num_items else np.zeros(0, dtype=np.int64)
        _check_range(indices, spec.num_categories, "item_features.categories")
        return cls(spec, torch.from_numpy(attrs), torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64)))

    @classmethod
    def load(cls, root: str | Path, spec: FeatureSpec) -> FeatureStore:
        paths = DatasetPaths(Path(root))
        attr_cols = [USER, *spec.attribute_keys]
        users = pq.read_table(paths.user_features, columns=attr_cols).to_pandas()
        items = pq.read_table(paths.item_features, columns=[ITEM, CATEGORIES]).to_pandas()
        return cls.from_frames(spec, users, items)

    def item_categories(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths) of the category bags of `items` (int64 [n]), in row order."""
        items = items.long()
        if self.cat_rows is not None:  # one gather + mask: much faster than repeat_interleave over ranges
            rows = self.cat_rows[items]
            real = rows >= 0
            return rows[real], real.sum(dim=1)
        starts = self.cat_indptr[items]
        lengths = self.cat_indptr[items + 1] - starts
        return _gather_ranges(self.cat_indices, starts, lengths), lengths


# Category bags are also kept as a -1 padded [num_items, longest bag] matrix unless that is this many times
# larger than the CSR (a few items with very long bags).
MAX_PADDING_FACTOR = 4


def _padded_rows(indptr: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
    lengths = indptr[1:] - indptr[:-1]
    width = int(lengths.max()) if lengths.numel() else 0
    if width == 0 or lengths.numel() * width > MAX_PADDING_FACTOR * max(1, indices.numel()):
        return None
    rows = torch.full((lengths.numel(), width), -1, dtype=torch.long, device=indices.device)
    pos = torch.arange(width, device=indices.device)[None, :]
    real = pos < lengths[:, None]
    rows[real] = indices  # CSR order is row-major, as the mask's
    return rows


def _check_range(values: np.ndarray, n: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= n):
        raise ValueError(f"{what} out of range [0, {n}): min {values.min()}, max {values.max()}")


def _gather_ranges(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenate flat[starts[i] : starts[i] + lengths[i]] for all i."""
    total = int(lengths.sum())
    if total == 0:
        return flat.new_zeros(0)
    out_starts = torch.cumsum(lengths, 0) - lengths
    idx = torch.repeat_interleave(starts - out_starts, lengths) + torch.arange(total, device=flat.device)
    return flat[idx]


def history_mask(history: torch.Tensor, history_len: torch.Tensor | None, n: int) -> torch.Tensor:
    """bool [batch, min(n, H)]: which of the first `n` positions of each padded history row hold a real id.

    A position is real iff it is < history_len (when given) AND its id is >= 0 (not PAD_ID). Id 0 is real:
    the mask is built from positions and the padding value, never from the truthiness of an id.
    """
    if history.ndim != 2:
        raise ValueError(f"history must be [batch, H], got shape {tuple(history.shape)}")
    h = history[:, : max(0, n)]
    mask = (h != PAD_ID) & (h >= 0)
    if history_len is not None:
        pos = torch.arange(h.shape[1], device=h.device)
        mask &= pos[None, :] < history_len.long().reshape(-1, 1)
    return mask


def history_bags(
    history: torch.Tensor, history_len: torch.Tensor | None, max_history: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, lengths) of the history bags: the real ids among the first `max_history` positions of each
    padded row (see `history_mask`), in row order. Id 0 is kept."""
    history = history.long()
    mask = history_mask(history, history_len, max_history)
    # Real ids are a prefix of each row (most recent first, padded at the end); masked_select keeps row order.
    return history[:, : mask.shape[1]][mask], mask.sum(dim=1)


def recent_slots(
    history: torch.Tensor, history_len: torch.Tensor | None, k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(values, lengths)] of k single-item bags: bag j holds the id at position j (j = 0: the most recent
    item) where that position is real, and is empty otherwise (a short history). Id 0 is kept."""
    history = history.long()
    mask = history_mask(history, history_len, k)
    out = []
    for j in range(k):
        if j < mask.shape[1]:
            real = mask[:, j]
            out.append((history[:, j][real], real.long()))
        else:
            out.append((history.new_zeros(0), history.new_zeros(history.shape[0])))
    return out


def build_kjt(
    spec: FeatureSpec,
    store: FeatureStore,
    stride: int,
    *,
    users: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    history_len: torch.Tensor | None = None,
    items: torch.Tensor | None = None,
) -> KeyedJaggedTensor:
    """The KJT of all `spec.keys` for `stride` rows.

    Query features fill the first ``len(users)`` rows (history/attributes follow `users`; pass `history` to
    include it), candidate features fill the first ``len(items)`` rows; every other bag is empty.
    """
    device = store.user_attrs.device
    bags: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(key: str, v: torch.Tensor, ln: torch.Tensor) -> None:
        n = ln.numel()
        if n > stride:
            raise ValueError(f"{n} rows do not fit in stride {stride}")
        bags[key] = (v.long(), torch.cat([ln.long(), torch.zeros(stride - n, dtype=torch.long, device=device)]))

    if users is not None:
        users = users.long().reshape(-1).to(device)
        ones = torch.ones_like(users)
        # -1: a user the tables do not hold (an online request from a new user): no id, attributes 0 (unknown)
        known = users >= 0
        if spec.use_user_id:
            add(USER_ID, users[known], known.long())
        if history is not None:
            history = history.to(device)
            history_len = None if history_len is None else history_len.to(device)
            hv, hl = history_bags(history, history_len, spec.max_history)
            if hl.numel() != users.numel():
                raise ValueError("history and users have different row counts")
            add(HISTORY_ITEMS, hv, hl)
            if spec.recent_items > 0 and spec.recent_slots:
                for key, (rv, rl) in zip(spec.recent_keys, recent_slots(history, history_len, spec.recent_items)):
                    add(key, rv, rl)
            elif spec.recent_items > 0:
                add(RECENT_ITEMS, *history_bags(history, history_len, spec.recent_items))
        attrs = torch.where(known[:, None], store.user_attrs[users.clamp(min=0)], 0)
        for j, key in enumerate(spec.attribute_keys):
            add(key, attrs[:, j], ones)

    if items is not None:
        items = items.long().reshape(-1).to(device)
        add(ITEM_ID, items, torch.ones_like(items))
        add(ITEM_CATEGORIES, *store.item_categories(items))

    empty = torch.zeros(0, dtype=torch.long, device=device)
    no_rows = torch.zeros(stride, dtype=torch.long, device=device)
    ordered = [bags.get(key, (empty, no_rows)) for key in spec.keys]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=spec.keys,
        values=torch.cat([v for v, _ in ordered]),
        lengths=torch.cat([ln for _, ln in ordered]),
    )


def batch_to_kjt(
    batch: Mapping[str, torch.Tensor],
    spec: FeatureSpec,
    store: FeatureStore,
    extra_items: torch.Tensor | None = None,
) -> KeyedJaggedTensor:
    """Training KJT of an MDS batch (columns of schema.MDS_COLUMNS, int32 as the block reader delivers them).

    Rows 0..B-1: the batch's query features and its positive items; rows B..B+N-1 (N = len(extra_items)):
    empty query bags and the extra negative items.
    """
    users = batch[USER].long()
    items = batch[ITEM].long()
    if extra_items is not None and extra_items.numel():
        items = torch.cat([items, extra_items.long().to(items.device)])
    return build_kjt(
        spec,
        store,
        stride=items.numel(),
        users=users,
        history=batch[HISTORY],
        history_len=batch.get(HISTORY_LEN),
        items=items,
    )


def stack_history(histories: Sequence, length: int) -> np.ndarray:
    """int32 [n, length] padded (PAD_ID) matrix from a sequence of variable-length id arrays (e.g. a Parquet
    list column), keeping the first `length` entries of each (they are most recent first)."""
    out = np.full((len(histories), length), PAD_ID, dtype=np.int32)
    for i, h in enumerate(histories):
        if h is None:
            continue
        a = np.asarray(h, dtype=np.int64)[:length]
        out[i, : len(a)] = a
    return out
