"""The data contract between the Spark side (producer) and training/evaluation (consumers).

Everything downstream of `interactions` speaks in contiguous 0-based integer ids. Id 0 is a real user /
item / category id; -1 is the only padding value.

On disk (under a dataset folder, see `DatasetPaths`):
- ``interactions/``   Parquet: INTERACTION_COLUMNS (cleaned, indexed)
- ``item_features/``  Parquet: item (int32), categories (array<int32>, may be empty), popularity (int64)
- ``user_features/``  Parquet: user (int32), one int32 column per user attribute (``attr_<name>``)
- ``splits/``         Parquet: the interactions + ``history``, ``history_len``, ``position`` (1-based, in the user's
                      order), ``ranker_window`` (the row is a ranker query: data/phases.py) and ``split`` in
                      {train, validation, test}
- ``mds/<folder>/``   MDS blocks (data/blocks.py) of MDS_COLUMNS, one folder per split (+ ``ranker_fit``: the train
                      rows before the ranker window, when there is one): index.json + layout.json
- ``user_index/``     Parquet: user (int32), raw_user (string): the source's id of every user
- ``item_index/``     Parquet: item (int32), raw_item (string), title (string, null where the source has none),
                      categories (array<string>, the source's names): the source's id of every item
- ``meta.json``       DatasetMeta as JSON (cardinalities the models need to size their tables, the source ids' type)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

USER = "user"
ITEM = "item"
TIMESTAMP = "timestamp"
RATING = "rating"
HISTORY = "history"  # fixed length, most recent first, padded with PAD_ID
HISTORY_LEN = "history_len"  # number of real ids in HISTORY
POSITION = "position"  # the row's place in its user's order, 1-based
RANKER_WINDOW = "ranker_window"  # a train row that is a ranker query (data/phases.py)
SPLIT = "split"
CATEGORIES = "categories"
PAD_ID = -1
# The source's ids (in the source's type: ID_TYPES) and item titles, as served (serving/source_ids.py).
USER_ID = "user_id"
ITEM_ID = "item_id"
TITLE = "title"
ID_TYPES = ("int64", "string")

SPLITS = ("train", "validation", "test")
# The MDS folders of a dataset: one per split, and the ranker phase's fit rows (train before the ranker window).
RANKER_FIT = "ranker_fit"
MDS_FOLDERS = (*SPLITS, RANKER_FIT)
# The splits a model is fitted on before it is scored on a phase's held-out row (leave-last-out protocol).
FIT_SPLITS_OF_PHASE = {"validation": ("train",), "test": ("train", "validation")}

# The ranker's pairs (data/ranking.py writes them, models/dlrm.py and training/dlrm.py read them): a 0/1 label,
# the dense feature vector, and the id of the candidate list a pair belongs to.
LABEL = "label"
DENSE = "dense"
QUERY_ID = "query_id"

# Spark type names of the cleaned interactions table.
INTERACTION_COLUMNS = {USER: "int", ITEM: "int", TIMESTAMP: "bigint", RATING: "float"}

# The split columns' numpy dtypes in the MDS blocks (data/mds.py split_layout; history is history_length wide).
MDS_COLUMNS = {
    USER: "int32",
    ITEM: "int32",
    TIMESTAMP: "int64",
    RATING: "float32",
    HISTORY: "int32",
    HISTORY_LEN: "int32",
}


# How each user's rows were ordered for the leave-last-out split: "timestamp" (a temporal split), or, for a
# table without time, "random" (seeded, per user) or "row" (the file's row order): not temporal. Each data
# stage folder carries it in ORDER_FILE; the dataset's meta.json as `order`.
ORDER_FILE = "order.json"
SPLIT_DESCRIPTIONS = {
    "timestamp": "leave-last-out by timestamp (temporal)",
    "random": "leave-last-out in a seeded random order per user (the table has no time: not temporal)",
    "row": "leave-last-out in the file's row order (the table has no time: not temporal)",
}


def write_order(folder: str | Path, order: str) -> None:
    if order not in SPLIT_DESCRIPTIONS:
        raise ValueError(f"unknown order {order!r}; expected one of {list(SPLIT_DESCRIPTIONS)}")
    (Path(folder) / ORDER_FILE).write_text(json.dumps({"order": order}))


def read_order(folder: str | Path) -> str:
    """The order recorded in a stage folder ("timestamp" for a folder written before orders were recorded)."""
    path = Path(folder) / ORDER_FILE
    return json.loads(path.read_text())["order"] if path.exists() else "timestamp"


# User attribute columns are named attr_<name> in user_features (and in the models' feature keys).
ATTR_PREFIX = "attr_"


def attribute_columns(cardinalities: dict[str, int]) -> list[tuple[str, int]]:
    """(column, cardinality) of the user attributes, sorted by name, each column prefixed with ATTR_PREFIX."""
    return [(n if n.startswith(ATTR_PREFIX) else ATTR_PREFIX + n, int(c)) for n, c in sorted(cardinalities.items())]


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    num_users: int
    num_items: int
    num_categories: int
    user_attribute_cardinalities: dict[str, int]
    history_length: int
    rows: dict[str, int]  # rows per split
    # Where the MDS splits were also uploaded (`<mds_remote>/<split>/`, a URI: s3://, gs://, dbfs:/, file://),
    # None when they exist only in the local `mds/` folder. Trainers read it with a local cache folder.
    mds_remote: str | None = None
    # The type of the source's user / item ids (ID_TYPES): "int64" when every raw id of that column is the
    # decimal form of an integer (MovieLens userId/movieId), else "string"; user_index/item_index map them back.
    user_id_type: str = "string"
    item_id_type: str = "string"
    order: str = "timestamp"  # see ORDER_FILE
    # The MDS splits' block layout (data/blocks.py: BlockLayout.to_dict()); readers of a remote copy check it.
    mds_layout: dict | None = None
    # The ranker window (data/phases.py): up to this many of each user's last train rows are ranker queries
    # (`ranker_queries` of them); mds/ranker_fit holds the other train rows. 0: no window, no ranker_fit.
    ranker_window: int = 0
    ranker_queries: int = 0

    @property
    def split_description(self) -> str:
        return SPLIT_DESCRIPTIONS[self.order]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetMeta:
        return cls(**json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> DatasetMeta:
        return cls.from_json(Path(path).read_text())


@dataclasses.dataclass(frozen=True)
class DatasetPaths:
    root: Path

    @property
    def interactions(self) -> Path:
        return self.root / "interactions"

    @property
    def item_features(self) -> Path:
        return self.root / "item_features"

    @property
    def user_features(self) -> Path:
        return self.root / "user_features"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def mds(self, folder: str) -> Path:
        if folder not in MDS_FOLDERS:
            raise ValueError(f"unknown MDS folder {folder!r}; expected one of {MDS_FOLDERS}")
        return self.root / "mds" / folder

    @property
    def user_index(self) -> Path:
        return self.root / "user_index"

    @property
    def item_index(self) -> Path:
        return self.root / "item_index"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"
