"""DLRM ranker on TorchRec's own modules (SparseArch → dense bottom MLP → pairwise dot interaction → top MLP).

The model is feature-layout driven, so the same code ranks retrieval candidates (user / item / categories /
history / user attributes + dense features) and trains on the Criteo display-advertising layout (26 hashed
categorical columns + 13 integer columns):

- `SparseFeature`: one KJT key, read from one sample column. A scalar int column is one id per row; an
  ``ndarray`` column is a multi-valued bag padded with -1 (``>= 0`` marks a real id: id 0 is real).
  Features may share a table (``table``), e.g. the candidate item and the user's history bag.
- `DLRMModelConfig`: embedding size, bottom (dense) and top (over) MLP sizes.
- `DLRMTrainTask`: logits + binary cross-entropy, the module that DistributedModelParallel wraps.
- `batch_to_kjt`: a collated Streaming batch (dict of tensors) → KeyedJaggedTensor in layout order.

No Dagster, no Spark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_assets.data.schema import DENSE
from recsys_assets.models.rows import batch_with_min_rows

TRAIN_TASK_PREFIX = "dlrm."


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    name: str  # KJT key and sample column
    table: str  # embedding table (shared by features with the same table name)
    num_embeddings: int
    multi_valued: bool = False  # ndarray column padded with -1 (a bag), else one id per row
    pooling: str = "mean"  # for bags: "mean" | "sum"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DLRMModelConfig:
    dense_in_features: int
    embedding_dim: int = 16
    bottom_layer_sizes: tuple[int, ...] = (64, 16)  # last must equal embedding_dim
    top_layer_sizes: tuple[int, ...] = (64, 32, 1)  # last must be 1 (the logit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bottom_layer_sizes", tuple(int(x) for x in self.bottom_layer_sizes))
        object.__setattr__(self, "top_layer_sizes", tuple(int(x) for x in self.top_layer_sizes))
        if self.dense_in_features <= 0:
            raise ValueError("DLRM needs at least one dense feature (dense_in_features > 0)")
        if not self.bottom_layer_sizes or self.bottom_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                f"bottom_layer_sizes must end with embedding_dim={self.embedding_dim} (the dense vector joins "
                f"the pairwise interaction), got {self.bottom_layer_sizes}"
            )
        if not self.top_layer_sizes or self.top_layer_sizes[-1] != 1:
            raise ValueError(f"top_layer_sizes must end with 1 (one logit), got {self.top_layer_sizes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> DLRMModelConfig:
        return cls(**dict(d))


def layout_from_dicts(items: Sequence[Mapping]) -> list[SparseFeature]:
    return [SparseFeature(**dict(x)) for x in items]


def validate_layout(layout: Sequence[SparseFeature]) -> None:
    if not layout:
        raise ValueError("a DLRM needs at least one sparse feature")
    names = [f.name for f in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate sparse feature names in {names}")
    sizes: dict[str, int] = {}
    for f in layout:
        if f.num_embeddings <= 0:
            raise ValueError(f"sparse feature {f.name!r}: num_embeddings must be positive, got {f.num_embeddings}")
        if sizes.setdefault(f.table, f.num_embeddings) != f.num_embeddings:
            raise ValueError(f"table {f.table!r} is given two sizes ({sizes[f.table]} and {f.num_embeddings})")
        if f.pooling not in ("mean", "sum"):
            raise ValueError(f"sparse feature {f.name!r}: pooling must be 'mean' or 'sum'")


def embedding_bag_configs(layout: Sequence[SparseFeature], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table, features in layout order (DLRM's interaction order)."""
    validate_layout(layout)
    tables: dict[str, list[SparseFeature]] = {}
    for f in layout:
        tables.setdefault(f.table, []).append(f)
    configs = []
    for table, feats in tables.items():
        pooling = PoolingType.SUM if all(f.pooling == "sum" for f in feats) else PoolingType.MEAN
        configs.append(
            EmbeddingBagConfig(
                name=f"t_{table}",
                embedding_dim=embedding_dim,
                num_embeddings=feats[0].num_embeddings,
                feature_names=[f.name for f in feats],
                pooling=pooling,
            )
        )
    return configs


def kjt_keys(layout: Sequence[SparseFeature]) -> list[str]:
    """KJT key order = the EBC's feature order (grouped by table, tables in first-appearance order)."""
    return [name for cfg in embedding_bag_configs(layout, 1) for name in cfg.feature_names]


def build_dlrm(
    layout: Sequence[SparseFeature],
    config: DLRMModelConfig,
    device: torch.device | str | None = None,
    table_device: torch.device | str | None = None,
) -> DLRM:
    """TorchRec DLRM; tables on `table_device` ("meta" before sharding), MLPs on `device`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    table_device = torch.device(table_device) if table_device is not None else device
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(layout, config.embedding_dim), device=table_device)
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=config.dense_in_features,
        dense_arch_layer_sizes=list(config.bottom_layer_sizes),
        over_arch_layer_sizes=list(config.top_layer_sizes),
        dense_device=device,
    )


class DLRMTrainTask(nn.Module):
    """(dense, kjt, labels) → (mean BCE-with-logits loss, logits). DMP shards `dlrm`'s tables."""

    def __init__(self, dlrm: DLRM) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(
        self, dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.dlrm(dense, kjt).squeeze(-1)
        return self.loss_fn(logits, labels.float()), logits.detach()


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = TRAIN_TASK_PREFIX) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_dlrm(
    state_dict: Mapping[str, torch.Tensor],
    layout: Sequence[SparseFeature],
    config: DLRMModelConfig,
    device: torch.device | str = "cpu",
) -> DLRM:
    model = build_dlrm(layout, config, device=device)
    model.load_state_dict(strip_prefix(state_dict), strict=True)
    return model.eval()


def batch_to_kjt(batch: Mapping[str, torch.Tensor], layout: Sequence[SparseFeature]) -> KeyedJaggedTensor:
    """A collated batch → KJT with one key per sparse feature (in `kjt_keys` order).

    Scalar columns give one id per row; ndarray columns give the ids ``>= 0`` of each row (-1 is padding;
    0 is a real id — never test ids for truthiness). Ids outside [0, num_embeddings) raise: an undersized
    table would otherwise read another row's memory or crash inside the kernel.
    """
    by_name = {f.name: f for f in layout}
    values, lengths = [], []
    stride = None
    for key in kjt_keys(layout):
        f = by_name[key]
        if key not in batch:
            raise KeyError(f"batch lacks the sparse feature column {key!r}")
        col = torch.as_tensor(batch[key])
        if f.multi_valued:
            if col.ndim != 2:
                raise ValueError(f"sparse feature {key!r} is multi-valued: expected [B, L], got {tuple(col.shape)}")
            mask = col >= 0
            v = col[mask].long()
            ln = mask.sum(dim=1).to(torch.int32)
        else:
            col = col.reshape(-1)
            if bool((col < 0).any()):
                raise ValueError(f"sparse feature {key!r} has a negative id")
            v = col.long()
            ln = torch.ones(col.shape[0], dtype=torch.int32)
        if v.numel() and int(v.max()) >= f.num_embeddings:
            raise ValueError(
                f"sparse feature {key!r} has id {int(v.max())} but its table {f.table!r} has only "
                f"{f.num_embeddings} rows"
            )
        if stride is None:
            stride = ln.shape[0]
        elif ln.shape[0] != stride:
            raise ValueError(f"sparse feature {key!r} has {ln.shape[0]} rows, expected {stride}")
        values.append(v)
        lengths.append(ln)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt_keys(layout), values=torch.cat(values), lengths=torch.cat(lengths)
    )


def dense_tensor(batch: Mapping[str, torch.Tensor], dense_in_features: int) -> torch.Tensor:
    dense = torch.as_tensor(batch[DENSE]).float()
    if dense.ndim != 2 or dense.shape[1] != dense_in_features:
        raise ValueError(f"dense features: expected [B, {dense_in_features}], got {tuple(dense.shape)}")
    return dense


class DLRMScorer(nn.Module):
    """Inference wrapper on an unsharded DLRM: a collated batch (dict) → logits [B]."""

    def __init__(self, dlrm: DLRM, layout: Sequence[SparseFeature], config: DLRMModelConfig) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.layout = list(layout)
        self.config = config

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B], computed on at least `rows.MIN_ROWS` rows (a pair's score does not depend on its batch)."""

        def score(rows: dict) -> torch.Tensor:
            kjt = batch_to_kjt(rows, self.layout)
            return self.dlrm(dense_tensor(rows, self.config.dense_in_features), kjt).squeeze(-1)

        return batch_with_min_rows(score, batch)
