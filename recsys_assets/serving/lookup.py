"""One user's served list from a published recommendations folder (`source_ids.publish_recommendations`), in
the source's ids: the two-stage top-k, or for a user the table does not hold the most popular items, flagged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_assets.data import schema as S
from recsys_assets.serving.source_ids import POPULAR_FILE, POPULARITY, RECOMMENDATIONS_FILE

TWO_STAGE = "two-stage (Two Tower → DLRM)"
POPULAR = "popular"
FALLBACK_NOTE = "fallback: unknown user, popular items"
LOOKUP_COLUMNS = ["rank", S.ITEM_ID, S.TITLE, S.CATEGORIES, "score", "stage"]


@dataclasses.dataclass(frozen=True)
class Lookup:
    user: str  # as asked
    rows: pd.DataFrame  # LOOKUP_COLUMNS
    fallback: bool  # the user is not in the recommendations: rows are the popular items
    provenance: dict[str, str]  # the model runs (and versions) behind the recommendations

    def format(self) -> str:
        head = f"user {self.user}: " + (FALLBACK_NOTE if self.fallback else f"top {len(self.rows)}")
        prov = ", ".join(f"{k}={v}" for k, v in self.provenance.items())
        note = "score: interactions in train + validation" if self.fallback else f"served by: {prov}" if prov else ""
        shown = self.rows.assign(
            **{
                S.CATEGORIES: self.rows[S.CATEGORIES].map(_join),
                S.TITLE: self.rows[S.TITLE].fillna(""),
                "score": self.rows["score"].map(lambda s: f"{s:.4f}" if isinstance(s, float) else str(s)),
            }
        )
        table = shown.to_string(index=False) if len(shown) else "(no items)"
        return "\n".join([head] + ([note] if note else []) + [table])


def _join(categories) -> str:
    return "|".join(str(c) for c in categories) if categories is not None else ""


def _user_key(user: str, ids: pd.Series):
    """`user` (a command-line string) in the type of the table's user_id column; None if it cannot be one."""
    if pd.api.types.is_integer_dtype(ids.dtype):
        try:
            return int(user)
        except ValueError:
            return None
    return user


def lookup(recommendations_root: str | Path, user: str, k: int = 10) -> Lookup:
    """`user`'s top `k` (by rank) from the published recommendations; a user they do not hold gets the `k` most
    popular items (popular.parquet) with fallback=True."""
    root = Path(recommendations_root)
    recs = pd.read_parquet(root / RECOMMENDATIONS_FILE)
    if S.USER_ID not in recs:
        raise ValueError(f"{root / RECOMMENDATIONS_FILE} has no {S.USER_ID} column (published before source ids)")
    key = _user_key(user, recs[S.USER_ID])
    mine = recs[recs[S.USER_ID] == key].sort_values("rank").head(k) if key is not None else recs.iloc[:0]
    provenance = {c: str(recs[c].iloc[0]) for c in recs.columns if c.endswith(("_run_id", "_version")) and len(recs)}
    if len(mine):
        rows = mine.assign(score=mine["dlrm_score"].astype(float), stage=TWO_STAGE)
        return Lookup(user, rows[LOOKUP_COLUMNS].reset_index(drop=True), False, provenance)
    popular = pd.read_parquet(root / POPULAR_FILE).head(k)
    rows = popular.assign(rank=np.arange(len(popular), dtype=np.int32), score=popular[POPULARITY], stage=POPULAR)
    return Lookup(user, rows[LOOKUP_COLUMNS].reset_index(drop=True), True, provenance)
