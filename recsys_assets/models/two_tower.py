"""The Two Tower retrieval model (pure torch / TorchRec), in the shape of TorchRec's examples/retrieval:

- `TwoTower`: embedding tables shared by both towers + a query MLP and a candidate MLP.
  Query tower: [user id] + the user's history + user attributes. The history is read by one of two encoders
  (`FeatureSpec.query_encoder`):
  - ``bag``: the history's item ids MEAN pooled, + the last k history items (``recent_items``: their own bag, or
    one feature per position). The recency feature keeps the latest item visible to the MLP: in a mean over H
    items it weighs 1/H, yet it drives the next choice most. A bag cannot tell "A then B" from "B then A".
  - ``sequence``: the last ``max_history`` items unpooled (TorchRec EmbeddingCollection), in order, through
    causal self-attention (`attention.CausalSequenceEncoder`, shared with the SASRec reference); the state at
    the most recent item, beside the user features, feeds the query MLP.
  Candidate tower: item id + the item's categories (multi-valued bag, MEAN pooled).
  The item-id table is ONE table read by the history, the recency feature(s) and ``item_id``, so the past items
  and the candidates live in the same embedding space (for ``sequence`` it lives in the EmbeddingCollection,
  the other tables in the EmbeddingBagCollection).
- `TwoTowerTrainTask`: in-batch sampled softmax with log-Q correction and optional extra uniform negatives.
- `QueryEncoder` / `ItemEncoder`: inference on an unsharded model loaded from a plain state dict.

Scores are ``scale * <q, c>`` with ``scale = 1 / temperature`` (fixed, or learned when
``learn_temperature``); tower outputs are L2-normalized when ``normalize``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys_assets.models.attention import CausalSequenceEncoder, left_padded
from recsys_assets.models.features import (
    HISTORY_ITEMS,
    ITEM_CATEGORIES,
    ITEM_ID,
    USER_ID,
    FeatureSpec,
    FeatureStore,
    build_kjt,
)
from recsys_assets.models.rows import with_min_rows

USER_TABLE = "t_user"
ITEM_TABLE = "t_item"
CATEGORY_TABLE = "t_category"
ATTR_TABLE_PREFIX = "t_"

# Key prefix of the TwoTower inside the train task (and so in a gathered DMP state dict).
TRAIN_TASK_PREFIX = "two_tower."


@dataclasses.dataclass(frozen=True)
class TwoTowerModelConfig:
    """Everything needed (with a FeatureSpec) to rebuild the model for a state dict."""

    embedding_dim: int = 32
    layer_sizes: tuple[int, ...] = (64, 32)  # hidden sizes..., output size of each tower's MLP
    normalize: bool = True
    temperature: float = 0.05
    learn_temperature: bool = False
    # the sequence query encoder (FeatureSpec.query_encoder == "sequence"); unused by the bag encoder
    sequence_blocks: int = 1
    sequence_heads: int = 1
    sequence_dropout: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_sizes", tuple(int(s) for s in self.layer_sizes))
        if not self.layer_sizes:
            raise ValueError("layer_sizes must name at least the output size")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_sizes"] = list(self.layer_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TwoTowerModelConfig:
        return cls(**dict(d))


def embedding_bag_configs(spec: FeatureSpec, embedding_dim: int) -> list[EmbeddingBagConfig]:
    """The pooled tables, sized on the dataset meta. Cardinalities of 0 get one (unused) row.

    The item table is read by ``history``, the recent-item feature(s) and ``item_id``: the user's past items and
    the candidates share one embedding space. It is here for the bag encoder; the sequence encoder reads it
    unpooled (`embedding_configs`). The user-id table exists only when `spec.use_user_id`.
    """
    tables = []
    if spec.use_user_id:
        tables.append(_bag_table(USER_TABLE, spec.num_users, [USER_ID], PoolingType.SUM, embedding_dim))
    if not spec.sequence_keys:
        tables.append(
            _bag_table(
                ITEM_TABLE, spec.num_items, [HISTORY_ITEMS, *spec.recent_keys, ITEM_ID], PoolingType.MEAN, embedding_dim
            )
        )
    tables.append(_bag_table(CATEGORY_TABLE, spec.num_categories, [ITEM_CATEGORIES], PoolingType.MEAN, embedding_dim))
    for col, card in spec.user_attributes:
        tables.append(_bag_table(ATTR_TABLE_PREFIX + col, card, [col], PoolingType.SUM, embedding_dim))
    return tables


def _bag_table(name: str, rows: int, features: list[str], pooling: PoolingType, dim: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=max(1, rows), feature_names=features, pooling=pooling
    )


def embedding_configs(spec: FeatureSpec, embedding_dim: int) -> list[EmbeddingConfig]:
    """The unpooled tables: the item table of the sequence encoder (history and candidate item), else none."""
    if not spec.sequence_keys:
        return []
    return [
        EmbeddingConfig(
            name=ITEM_TABLE,
            embedding_dim=embedding_dim,
            num_embeddings=max(1, spec.num_items),
            feature_names=list(spec.sequence_keys),
        )
    ]


def table_configs(spec: FeatureSpec, embedding_dim: int) -> list[EmbeddingBagConfig | EmbeddingConfig]:
    """Every table of the model (what the sharding planner plans)."""
    return [*embedding_bag_configs(spec, embedding_dim), *embedding_configs(spec, embedding_dim)]


def feature_to_table(spec: FeatureSpec) -> dict[str, str]:
    """One single-valued feature per table (for looking rows up through the EBC)."""
    out = {USER_TABLE: USER_ID} if spec.use_user_id else {}
    out.update({ITEM_TABLE: ITEM_ID, CATEGORY_TABLE: ITEM_CATEGORIES})
    for col, _ in spec.user_attributes:
        out[ATTR_TABLE_PREFIX + col] = col
    return out


def mlp(in_size: int, layer_sizes: Sequence[int], device: torch.device | None = None) -> nn.Sequential:
    """Linear + ReLU for the hidden layers, a plain Linear output (a ReLU output would confine the vectors to
    the positive orthant, which a dot-product score cannot afford)."""
    layers: list[nn.Module] = []
    size = in_size
    for i, out in enumerate(layer_sizes):
        layers.append(nn.Linear(size, out, device=device))
        if i < len(layer_sizes) - 1:
            layers.append(nn.ReLU())
        size = out
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """Query and candidate towers over one EmbeddingBagCollection (+ one EmbeddingCollection for the sequence
    encoder).

    Args:
        embedding_bag_collection: built from `embedding_bag_configs(spec, ...)` (any device, incl. meta).
        spec: feature names / cardinalities.
        config: model hyper-parameters.
        device: device of the dense (MLP, attention) parameters.
        embedding_collection: built from `embedding_configs(spec, ...)`; required iff spec's encoder is sequence.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        spec: FeatureSpec,
        config: TwoTowerModelConfig,
        device: torch.device | None = None,
        embedding_collection: EmbeddingCollection | None = None,
    ) -> None:
        super().__init__()
        if (embedding_collection is None) != (not spec.sequence_keys):
            raise ValueError(f"query_encoder {spec.query_encoder!r}: an EmbeddingCollection is needed iff 'sequence'")
        self.ebc = embedding_bag_collection
        self.ec = embedding_collection
        self.spec = spec
        self.config = config
        dims = {f: t.embedding_dim for t in embedding_bag_collection.embedding_bag_configs() for f in t.feature_names}
        self.sequence_encoder = None
        if embedding_collection is not None:
            dims.update({f: t.embedding_dim for t in embedding_collection.embedding_configs() for f in t.feature_names})
            self.sequence_encoder = CausalSequenceEncoder(
                hidden=dims[HISTORY_ITEMS],
                blocks=config.sequence_blocks,
                heads=config.sequence_heads,
                max_len=max(1, spec.max_history),
                dropout=config.sequence_dropout,
            ).to(device)
        self._query_features = list(spec.query_keys)
        self._candidate_features = list(spec.candidate_keys)
        self.query_proj = mlp(sum(dims[f] for f in self._query_features), config.layer_sizes, device)
        self.candidate_proj = mlp(sum(dims[f] for f in self._candidate_features), config.layer_sizes, device)
        scale = torch.tensor(math.log(1.0 / config.temperature), device=device)
        if config.learn_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    @property
    def output_dim(self) -> int:
        return self.config.layer_sizes[-1]

    def scale(self) -> torch.Tensor:
        # 1/temperature, capped at 100 as in CLIP.
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def _project(self, pooled: dict[str, torch.Tensor], features: list[str], proj: nn.Module) -> torch.Tensor:
        out = proj(torch.cat([pooled[f] for f in features], dim=1))
        return F.normalize(out, dim=1) if self.config.normalize else out

    def pooled(self, kjt: KeyedJaggedTensor, query_rows: int | None = None) -> dict[str, torch.Tensor]:
        """{feature: [stride, dim]}: the pooled embeddings; with the sequence encoder also the candidate item's
        row and the history's state at its most recent item (zeros for an empty history, and for the rows after
        the first `query_rows`, which are candidates only)."""
        if self.ec is None:
            return _waited(self.ebc(kjt)).to_dict()
        bags, sequences = self._split(kjt)
        out = _waited(self.ebc(bags)).to_dict()
        unpooled = _waited(self.ec(sequences))
        out[ITEM_ID] = _single_rows(unpooled[ITEM_ID], kjt.stride())
        out[HISTORY_ITEMS] = self._latest_states(unpooled[HISTORY_ITEMS], query_rows)
        return out

    def _latest_states(self, history: JaggedTensor, query_rows: int | None) -> torch.Tensor:
        """[stride, d]: the state at each row's most recent item (zeros for an empty history), for the first
        `query_rows` rows (None: all). The rest are zeros: a training batch's candidate-only rows (uniform
        negatives) have no history, and encoding them multiplied the encoder's cost by the pool's size."""
        lengths = history.lengths()
        stride = lengths.shape[0]
        rows = stride if query_rows is None else min(query_rows, stride)
        queries = JaggedTensor(values=history.values()[: int(lengths[:rows].sum())], lengths=lengths[:rows])
        states, is_pad = self.history_states(queries, last_only=True)
        latest = states[:, -1] * (~is_pad[:, -1]).unsqueeze(-1)
        return F.pad(latest, (0, 0, 0, stride - rows)) if rows < stride else latest

    def sequence_states(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence encoder's state at every history position of `kjt`'s rows (see `history_states`)."""
        if self.ec is None:
            raise ValueError("the bag query encoder has no per-position states")
        return self.history_states(_waited(self.ec(self._split(kjt)[1]))[HISTORY_ITEMS])

    def _split(self, kjt: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        """(the EmbeddingBagCollection's features, the EmbeddingCollection's): `FeatureSpec.keys` puts them last."""
        n_sequence = len(self.spec.sequence_keys)
        bags, sequences = kjt.split([len(kjt.keys()) - n_sequence, n_sequence])
        return bags, sequences

    def history_states(self, history: JaggedTensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence encoder over the unpooled history rows (most recent first): (states [B, L, d], is_pad
        [B, L]), oldest first, the most recent item in the last column; L = the longest row of the batch. With
        `last_only`, the states of the last column alone ([B, 1, d], the same numbers, cheaper)."""
        lengths = history.lengths()
        width = max(1, int(lengths.max())) if lengths.numel() else 1
        items, is_pad = left_padded(history.values(), lengths, width)
        # the SASRec scaling: the positions are added to item vectors of about unit scale
        states = self.sequence_encoder(items * items.shape[-1] ** 0.5, is_pad, last_only=last_only)
        return states, is_pad[:, -1:] if last_only else is_pad

    def forward(self, kjt: KeyedJaggedTensor, query_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers for every row of `kjt` (rows with empty bags give meaningless vectors; callers slice the
        first `query_rows` queries, the rows whose history is read)."""
        pooled = self.pooled(kjt, query_rows)
        return (
            self._project(pooled, self._query_features, self.query_proj),
            self._project(pooled, self._candidate_features, self.candidate_proj),
        )

    def query(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self._project(self.pooled(kjt), self._query_features, self.query_proj)

    def candidate(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self._project(self.pooled(kjt), self._candidate_features, self.candidate_proj)


def _waited(out):
    """A sharded module returns an awaitable: waited here."""
    return out.wait() if hasattr(out, "wait") else out


def _single_rows(feature: JaggedTensor, stride: int) -> torch.Tensor:
    """[stride, d] of a feature with 0 or 1 id per row (zeros where a row has none)."""
    values = feature.values()
    if values.shape[0] == stride:  # every row has its id (training batches): no scatter needed
        return values
    out = values.new_zeros(stride, values.shape[-1])
    out[feature.lengths().bool()] = values
    return out


def build_two_tower(
    spec: FeatureSpec,
    config: TwoTowerModelConfig,
    device: torch.device | str = "cpu",
    table_device: torch.device | str | None = None,
) -> TwoTower:
    """A TwoTower; tables on `table_device` (default `device`; use "meta" before sharding)."""
    device = torch.device(device)
    table_device = torch.device(table_device) if table_device is not None else device
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec, config.embedding_dim), device=table_device)
    unpooled = embedding_configs(spec, config.embedding_dim)
    ec = EmbeddingCollection(tables=unpooled, device=table_device) if unpooled else None
    return TwoTower(ebc, spec, config, device=device, embedding_collection=ec)


def sampled_softmax_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    candidate_items: torch.Tensor,
    scale: torch.Tensor | float,
    candidate_log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch sampled softmax.

    Args:
        query: [B, d]; row i's positive is candidate i.
        candidates: [S, d], S >= B: the B positives, then any extra sampled negatives.
        candidate_items: int64 [S] item id of each candidate.
        scale: logit multiplier (1 / temperature).
        candidate_log_q: [S] log of each candidate's expected count in the sampled pool (log-Q correction);
            subtracted from every logit of that column (also the positive's, as in Yi et al. 2019).

    Candidates equal to a row's positive item (other than the positive itself) are masked: they are not
    negatives. Returns (mean loss, logits [B, S]).
    """
    b = query.shape[0]
    logits = (query @ candidates.T) * scale
    if candidate_log_q is not None:
        logits = logits - candidate_log_q[None, :]
    items = candidate_items.long()
    same = items[None, :] == items[:b, None]
    diag = torch.arange(b, device=logits.device)
    same[diag, diag] = False
    logits = logits.masked_fill(same, torch.finfo(logits.dtype).min / 2)
    return F.cross_entropy(logits, diag), logits


class TwoTowerTrainTask(nn.Module):
    """Training wrapper: forward(kjt, candidate_items, candidate_log_q, num_queries) -> (loss, detached logits).

    `kjt` comes from `features.batch_to_kjt` (query features on the first `num_queries` rows, candidates on all
    rows); the model is what DistributedModelParallel wraps.
    """

    def __init__(self, two_tower: TwoTower) -> None:
        super().__init__()
        self.two_tower = two_tower

    def forward(
        self,
        kjt: KeyedJaggedTensor,
        candidate_items: torch.Tensor,
        candidate_log_q: torch.Tensor | None,
        num_queries: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, c = self.two_tower(kjt, num_queries)
        loss, logits = sampled_softmax_loss(
            q[:num_queries], c, candidate_items, self.two_tower.scale(), candidate_log_q
        )
        return loss, logits.detach()


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = TRAIN_TASK_PREFIX) -> dict[str, torch.Tensor]:
    """TwoTower state dict from a train-task / gathered DMP state dict (keys without `prefix` are kept)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_two_tower(
    state_dict: Mapping[str, torch.Tensor],
    spec: FeatureSpec,
    config: TwoTowerModelConfig,
    device: torch.device | str = "cpu",
) -> TwoTower:
    """An unsharded TwoTower (eval mode) from a plain state dict (train-task keys or TwoTower keys)."""
    model = build_two_tower(spec, config, device=device)
    model.load_state_dict(strip_prefix(state_dict), strict=True)
    return model.eval()


class QueryEncoder(nn.Module):
    """users (+ their recent history) -> query vectors, on an unsharded TwoTower."""

    def __init__(self, two_tower: TwoTower, store: FeatureStore) -> None:
        super().__init__()
        self.two_tower = two_tower
        self.store = store

    def forward(
        self,
        users: torch.Tensor,
        history: torch.Tensor,
        history_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """users int [n]; history int [n, H] padded with -1, most recent first; history_len int [n]. Computed on
        at least `rows.MIN_ROWS` rows, so a query's vector does not depend on the batch it is in."""

        def encode(users, history, history_len):
            kjt = build_kjt(
                self.two_tower.spec, self.store, users.numel(), users=users, history=history, history_len=history_len
            )
            return self.two_tower.query(kjt)

        return with_min_rows(encode, users.reshape(-1), history, history_len)


class ItemEncoder(nn.Module):
    """item ids -> candidate vectors, on an unsharded TwoTower."""

    def __init__(self, two_tower: TwoTower, store: FeatureStore) -> None:
        super().__init__()
        self.two_tower = two_tower
        self.store = store

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        kjt = build_kjt(self.two_tower.spec, self.store, stride=items.numel(), items=items)
        return self.two_tower.candidate(kjt)

    @torch.no_grad()
    def encode_all(self, batch_size: int = 4096) -> torch.Tensor:
        """[num_items, d] vectors of every item, in id order."""
        n = self.two_tower.spec.num_items
        device = self.store.user_attrs.device
        out = [self(torch.arange(s, min(s + batch_size, n), device=device)) for s in range(0, n, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.two_tower.output_dim, device=device)


def score(query_vectors: torch.Tensor, item_vectors: torch.Tensor, two_tower: TwoTower | None = None) -> torch.Tensor:
    """[n, num_items] scores (the scale does not change rankings; it is applied when a model is given)."""
    s = query_vectors @ item_vectors.T
    return s * two_tower.scale() if two_tower is not None else s
