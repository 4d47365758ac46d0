"""The phases of the funnel as data: where models are fitted, and whose rows they are asked about.

Each user's rows are in the user's order (schema.POSITION). A phase's fit rows of a user are a prefix of that
order and its queries come after the prefix, so no query sees a row at or after its own place, in its
candidate models or in its features:

| phase      | queries (held-out rows)                         | fit rows (models, features)          |
|------------|-------------------------------------------------|--------------------------------------|
| ranker     | the ranker window: up to `ranker_window` of the | train rows before the window         |
|            | user's last train rows (each has an earlier row)| (MDS folder ranker_fit)              |
| validation | the validation row                              | train                                |
| test       | the test row                                    | train + validation                   |

The ranker trains on the ranker phase's lists (many per user), its epochs and gate are chosen on the validation
lists, and the test lists are served. With `ranker_window` 0 the ranker phase is empty and the ranker trains
on the validation lists of most users (a hashed share is held out), as before the window existed.

Code runs one function per phase over a `Phase`, never `if phase == ...`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from recsys_assets.data import schema as S

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import Column

# The default `ranker_window` (interaction_splits config), chosen on validation lists (README "The ranker window").
RANKER_WINDOW_DEFAULT = 20
# A query's id: its user for a phase with one query per user; a ranker-window query adds its place counted
# from the end of the user's train rows (1 = the last train row) times this stride.
QUERY_ID_STRIDE = 1 << 32


@dataclasses.dataclass(frozen=True)
class RowSet:
    """Rows of the splits table: those of `splits`, and with `window` True / False only the rows inside /
    outside the ranker window (None: both)."""

    splits: tuple[str, ...]
    window: bool | None = None

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        keep = frame[S.SPLIT].isin(self.splits).to_numpy()
        if self.window is not None:
            keep &= frame[S.RANKER_WINDOW].to_numpy(bool) == self.window
        return keep

    def column(self) -> Column:
        """The same rows as a Spark filter."""
        from pyspark.sql import functions as F

        keep = F.col(S.SPLIT).isin(list(self.splits))
        if self.window is not None:
            keep = keep & (F.col(S.RANKER_WINDOW) == F.lit(self.window))
        return keep


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    queries: RowSet  # its held-out rows, each one query
    fit: RowSet  # the rows its candidate models and features are fitted on
    mds_folders: tuple[str, ...]  # the MDS folders (schema.DatasetPaths.mds) that hold exactly the fit rows
    one_query_per_user: bool
    description: str


def _held_out(name: str, description: str) -> Phase:
    """The evaluator's phases: one held-out row per user, fitted on the splits before it."""
    fit = S.FIT_SPLITS_OF_PHASE[name]
    return Phase(name, RowSet((name,)), RowSet(fit), fit, one_query_per_user=True, description=description)


PHASES = {
    "ranker": Phase(
        "ranker",
        queries=RowSet(("train",), window=True),
        fit=RowSet(("train",), window=False),
        mds_folders=(S.RANKER_FIT,),
        one_query_per_user=False,
        description="the ranker window's rows, fitted on the train rows before the window",
    ),
    "validation": _held_out("validation", "the validation row, fitted on train"),
    "test": _held_out("test", "the test row, fitted on train + validation"),
}


# The rows each MDS folder holds (schema.MDS_FOLDERS): one per split, and ranker_fit (the train rows before the
# ranker window: the ranker phase's fit rows).
MDS_FOLDER_ROWS = {
    **{name: RowSet((name,)) for name in S.SPLITS},
    S.RANKER_FIT: PHASES["ranker"].fit,
}


def rows_of_folders(frame: pd.DataFrame, folders: tuple[str, ...] | list[str]) -> np.ndarray:
    """bool mask of the rows of the splits table that the given MDS folders hold."""
    keep = np.zeros(len(frame), dtype=bool)
    for name in folders:
        if name not in MDS_FOLDER_ROWS:
            raise ValueError(f"unknown MDS folder {name!r}; expected one of {sorted(MDS_FOLDER_ROWS)}")
        keep |= MDS_FOLDER_ROWS[name].mask(frame)
    return keep


def phase(name: str) -> Phase:
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; expected one of {sorted(PHASES)}")
    return PHASES[name]


def query_ids(users: np.ndarray, steps_from_end: np.ndarray) -> np.ndarray:
    """int64 query ids (see QUERY_ID_STRIDE): `steps_from_end` 0 for a held-out row, k >= 1 for a window row."""
    return np.asarray(users, np.int64) + np.asarray(steps_from_end, np.int64) * QUERY_ID_STRIDE
