"""Online recommendations: the served funnel (Two Tower → pool merged with EASE → DLRM) for requests, from one
folder, the bundle, that `build_bundle` writes from the published assets. No Spark, JVM or Dagster.

Every step calls the function the batch path calls: `serving.retrieval` (query tower, exact / HNSW search,
ranks), `serving.item_item` (EASE scores, the merged pool), `serving.candidates.candidate_pairs` (the pairs and
their source scores), `data.ranker_features.feature_matrix` (the ranker's features: Spark runs the same registry)
and the DLRM. A known user without `recent_items` is the batch query of the served cutoff (its history, time and
seen items), so the answer equals `recommendations.parquet`; `recent_items` are appended to that history.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_assets.data import schema as S
from recsys_assets.serving.item_item import QueryScores

BUNDLE_FILE = "bundle.json"
QUERIES_FILE = "queries.npz"  # the served cutoff's query state of every user
TWO_TOWER_FOLDER, DLRM_FOLDER = "two_tower", "dlrm"  # model folders (training.model_files)
ITEM_FEATURES_FILE = "two_tower_features.npz"  # the Two Tower's side tables (FeatureStore)
USER_ATTRIBUTES_FILE = "user_attributes.npy"  # the DLRM's attribute columns per user
FEATURE_STATE_FILE = "feature_state.npz"  # data.ranker_features.FeatureState of the served cutoff
EASE_FILE = "ease_weights.npy"
USERS_FILE, ITEMS_FILE, POPULAR_FILE = "users.parquet", "items.parquet", "popular.parquet"
ONLINE_PHASE = "online"

REQUEST_FIELDS = ("user_id", "recent_items", "k", "exclude_seen")
DEFAULT_K = 10
MAX_REQUEST_USERS = 10_000
ANSWER_COLUMNS = [S.USER_ID, "rank", S.ITEM_ID, S.TITLE, "score", "stage", "fallback", "unknown_recent_items"]
POPULAR_STAGE = "popular"


# ------------------------------------------------------------------------------------------------ requests
class RequestError(ValueError):
    """A request the model cannot answer; the message names the field (and the row of a many-user request)."""


@dataclasses.dataclass(frozen=True)
class Request:
    user_id: Any  # in the source's id type
    recent_items: tuple = ()  # source item ids after the training data, oldest first
    k: int = DEFAULT_K
    exclude_seen: bool = True


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _source_id(value, id_type: str, where: str):
    """`value` as a source id of `id_type` ("int64": an integer, or a string of one; "string": any scalar)."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (list, tuple, dict, np.ndarray)):
        raise RequestError(f"{where} must be {'an integer' if id_type == 'int64' else 'a string'}, got {value!r}")
    if id_type != "int64":
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise RequestError(f"{where} must be an integer (this model's ids are integers), got {value!r}")


def _k_of(value, pool_size: int, where: str) -> int:
    if _missing(value):
        return DEFAULT_K
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and value.is_integer())
    if isinstance(value, (bool, np.bool_)) or not integral or not 1 <= int(value) <= pool_size:
        raise RequestError(f"{where} must be an integer from 1 to {pool_size} (the candidate pool), got {value!r}")
    return int(value)


def _flag_of(value, where: str) -> bool:
    if _missing(value):
        return True
    if not isinstance(value, (bool, np.bool_)):
        raise RequestError(f"{where} must be true or false, got {value!r}")
    return bool(value)


def _items_of(value, id_type: str, where: str) -> tuple:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise RequestError(f"{where} must be a list of item ids, got {value!r}")
    return tuple(_source_id(v, id_type, f"{where}[{j}]") for j, v in enumerate(value))


def parse_requests(frame: Any, *, pool_size: int, user_id_type: str, item_id_type: str) -> list[Request]:
    """One Request per row of `frame` (pandas, as MLflow hands a JSON request to `predict`); RequestError names
    the field and row of the first problem."""
    if not isinstance(frame, pd.DataFrame):
        raise RequestError(f"a request is a table of rows with the fields {list(REQUEST_FIELDS)}")
    unknown = [str(c) for c in frame.columns if c not in REQUEST_FIELDS]
    if unknown:
        raise RequestError(f"unknown request field(s) {unknown}; the fields are {list(REQUEST_FIELDS)}")
    if "user_id" not in frame.columns:
        raise RequestError("request field 'user_id' is missing")
    if not 1 <= len(frame) <= MAX_REQUEST_USERS:
        raise RequestError(f"a request holds 1 to {MAX_REQUEST_USERS} rows, got {len(frame)}")
    out = []
    for i, row in enumerate(frame.to_dict("records")):
        at = f"row {i}: field" if len(frame) > 1 else "field"
        if _missing(row["user_id"]):
            raise RequestError(f"{at} 'user_id' is missing")
        out.append(
            Request(
                user_id=_source_id(row["user_id"], user_id_type, f"{at} 'user_id'"),
                recent_items=_items_of(row.get("recent_items"), item_id_type, f"{at} 'recent_items'"),
                k=_k_of(row.get("k"), pool_size, f"{at} 'k'"),
                exclude_seen=_flag_of(row.get("exclude_seen"), f"{at} 'exclude_seen'"),
            )
        )
    return out


# -------------------------------------------------------------------------------------------------- bundle
def build_bundle(
    out_dir: Path,
    *,
    two_tower_root,
    index_root: str | Path,
    dataset_root: str | Path,
    candidates_root: str | Path,
    ranking_root: str | Path,
    dlrm_root,
    recommendations_root: str | Path,
    served_stage: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Everything the online funnel reads, into `out_dir`: the served Two Tower and DLRM, the item vectors (and
    the HNSW index when retrieval searched it), EASE's weights refitted on the served cutoff's fit rows, the
    served cutoff's feature state and query states, the id maps and the popular fallback. Returns bundle.json."""
    from recsys_assets.data.ranking import FEATURES_FOLDER
    from recsys_assets.data.splits import load_query_splits
    from recsys_assets.models.features import FeatureStore
    from recsys_assets.serving.candidates import HNSW_FILE, ITEM_VECTORS
    from recsys_assets.serving.source_ids import id_maps

    out_dir = Path(out_dir)
    retrieval = json.loads((Path(candidates_root) / "info.json").read_text())
    if retrieval.get("als_rank"):
        raise ValueError("two_stage_model: the ALS ranker features (retrieval_candidates.als_rank > 0) are not served")
    ranking = json.loads((Path(ranking_root) / "meta.json").read_text())
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    splits = load_query_splits(dataset_root)
    spec = _copy_models(out_dir, two_tower_root, dlrm_root)
    store = FeatureStore.load(dataset_root, spec)
    np.savez(
        out_dir / ITEM_FEATURES_FILE,
        **{k: getattr(store, k).numpy() for k in ("user_attrs", "cat_indptr", "cat_indices")},
    )
    _save_query_states(out_dir, splits, meta, spec.history_length)
    shutil.copy2(Path(index_root) / ITEM_VECTORS, out_dir / ITEM_VECTORS)
    if retrieval["index"] == "hnsw":
        shutil.copy2(Path(index_root) / HNSW_FILE, out_dir / HNSW_FILE)
    if retrieval.get("item_item_lambda") is not None:
        np.save(out_dir / EASE_FILE, _served_ease_weights(splits, retrieval["item_item_lambda"], meta))
    shutil.copy2(Path(ranking_root) / FEATURES_FOLDER / "test.npz", out_dir / FEATURE_STATE_FILE)
    attributes = _dlrm_user_attributes(dataset_root, ranking["attribute_columns"], meta.num_users)
    np.save(out_dir / USER_ATTRIBUTES_FILE, attributes)
    user_ids, item_info = id_maps(dataset_root)
    pd.DataFrame({S.USER: user_ids.index, S.USER_ID: user_ids.to_numpy()}).to_parquet(out_dir / USERS_FILE, index=False)
    item_info[[S.ITEM_ID, S.TITLE]].rename_axis(S.ITEM).reset_index().to_parquet(out_dir / ITEMS_FILE, index=False)
    shutil.copy2(Path(recommendations_root) / POPULAR_FILE, out_dir / POPULAR_FILE)
    info = {
        "k": int(min(retrieval["k"], meta.num_items)),
        "index": retrieval["index"],
        "item_item_lambda": retrieval.get("item_item_lambda"),
        "item_item_share": retrieval.get("item_item_share") or 0.0,
        "served_stage": served_stage,
        **{key: ranking[key] for key in ("history_length", "max_categories", "attribute_columns")},
        **{key: ranking[key] for key in ("feature_stats", "dense_features")},
        "user_id_type": meta.user_id_type,
        "item_id_type": meta.item_id_type,
        "default_timestamp": int(splits[S.TIMESTAMP].max()) + 1 if len(splits) else 0,
        **provenance,
    }
    (out_dir / BUNDLE_FILE).write_text(json.dumps(info, indent=2))
    return info


def _copy_models(out_dir: Path, two_tower_root, dlrm_root):
    """The served Two Tower (its test-phase fit) and the DLRM into their bundle folders; the Two Tower's spec."""
    from recsys_assets.training.model_files import DLRM_FILE, TWO_TOWER_FILES, load_trained_two_tower

    copies = ((TWO_TOWER_FOLDER, two_tower_root, TWO_TOWER_FILES["test"]), (DLRM_FOLDER, dlrm_root, DLRM_FILE))
    for folder, source, name in copies:
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(getattr(source, "path", source)) / name, out_dir / folder / name)
    return load_trained_two_tower(out_dir / TWO_TOWER_FOLDER)[1]


def _save_query_states(out_dir: Path, splits: pd.DataFrame, meta, history_length: int) -> None:
    """The served cutoff's query of every user (serving.retrieval.query_states, as retrieval_candidates makes it)."""
    from recsys_assets.serving.retrieval import query_states

    sizes = dict(num_users=meta.num_users, num_items=meta.num_items)
    states = query_states(splits, "test", history_length=history_length, all_users=True, **sizes)
    if len(np.unique(states.users)) != states.n:
        raise ValueError("two_stage_model: a user has several served queries (test rows); the bundle holds one each")
    arrays = {f.name: getattr(states, f.name) for f in dataclasses.fields(states) if f.name != "phase"}
    np.savez(out_dir / QUERIES_FILE, **arrays)


def _served_ease_weights(splits: pd.DataFrame, lam: float, meta) -> np.ndarray:
    """EASE of the served cutoff (fit on its fit rows), as retrieval_candidates fits it for the test phase."""
    from recsys_assets.evaluation.baselines import EASE
    from recsys_assets.serving.item_item import _phase_fit

    _, task = _phase_fit(splits, "test", meta.num_users, meta.num_items)
    return EASE(lam, max_items=meta.num_items, dtype=torch.float32).fit(task).B_.numpy()


def _dlrm_user_attributes(dataset_root, columns: Sequence[str], num_users: int) -> np.ndarray:
    """int64 [num_users, len(columns)]: the DLRM's attribute columns (0 = unknown, as data.ranking joins them)."""
    out = np.zeros((num_users, len(columns)), dtype=np.int64)
    if columns:
        users = pd.read_parquet(S.DatasetPaths(Path(dataset_root)).user_features, columns=[S.USER, *columns])
        out[users[S.USER].to_numpy(np.int64)] = users[list(columns)].fillna(0).to_numpy(np.int64)
    return out


# -------------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass
class _Query:
    """One request resolved to internal ids: the state the funnel scores."""

    request: Request
    user: int  # internal id; -1 for a user the tables do not hold
    history: np.ndarray  # int64 [H], most recent first, -1 padded
    history_len: int
    timestamp: int
    seen: np.ndarray  # distinct sorted items: EASE's input row
    excluded: np.ndarray  # removed from the rankings (seen, unless exclude_seen is false)
    unknown_recent: list


@dataclasses.dataclass
class _OnlineStates:
    """What `candidate_pairs`, `item_ranks` and the EASE scores read of serving.retrieval.QueryStates."""

    users: np.ndarray
    query_ids: np.ndarray
    exclude_indptr: np.ndarray
    exclude_indices: np.ndarray
    targets: np.ndarray

    @property
    def n(self) -> int:
        return len(self.users)


def _csr(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    return indptr, np.concatenate(rows).astype(np.int64) if len(rows) else np.zeros(0, np.int64)


class TwoStageScorer:
    """The online funnel over a bundle folder (`build_bundle`): `recommend(requests)` → one row per (user, rank)."""

    def __init__(self, root: str | Path) -> None:
        from recsys_assets.data.ranker_features import DENSE_FEATURES, FeatureState
        from recsys_assets.models.dlrm import DLRMScorer
        from recsys_assets.models.features import FeatureStore
        from recsys_assets.models.two_tower import QueryEncoder
        from recsys_assets.serving.candidates import HNSW_FILE, ITEM_VECTORS
        from recsys_assets.serving.retrieval import HnswIndex
        from recsys_assets.training.model_files import load_dlrm_model, load_trained_two_tower

        root = Path(root)
        self.info = info = json.loads((root / BUNDLE_FILE).read_text())
        model, spec = load_trained_two_tower(root / TWO_TOWER_FOLDER)
        tables = np.load(root / ITEM_FEATURES_FILE)
        store = FeatureStore(spec, *(torch.from_numpy(tables[k]) for k in ("user_attrs", "cat_indptr", "cat_indices")))
        self.query_encoder = QueryEncoder(model, store).eval()
        self.vectors = torch.from_numpy(np.load(root / ITEM_VECTORS))
        self.hnsw = HnswIndex.load(root / HNSW_FILE) if info["index"] == "hnsw" else None
        self.ease = None
        if info["item_item_lambda"] is not None:
            from recsys_assets.evaluation.baselines import EASE

            self.ease = EASE.from_weights(torch.from_numpy(np.load(root / EASE_FILE)), info["item_item_lambda"])
        self.state = FeatureState.load(root / FEATURE_STATE_FILE)
        self.num_users, self.num_items = self.state.num_users, len(self.vectors)
        self.state = self.state.with_unknown_user()  # id num_users: a user without fit rows
        dlrm, layout, cfg = load_dlrm_model(root / DLRM_FOLDER)
        self.dlrm, self.dlrm_reads_user = DLRMScorer(dlrm, layout, cfg), any(f.name == S.USER for f in layout)
        self.user_attributes = np.load(root / USER_ATTRIBUTES_FILE)
        self.queries = dict(np.load(root / QUERIES_FILE))
        self.query_of_user = np.full(self.num_users, -1, dtype=np.int64)
        self.query_of_user[self.queries["users"]] = np.arange(len(self.queries["users"]))
        users, items = pd.read_parquet(root / USERS_FILE), pd.read_parquet(root / ITEMS_FILE)
        self.user_of_id = dict(zip(users[S.USER_ID].tolist(), users[S.USER].tolist()))
        self.item_of_id = dict(zip(items[S.ITEM_ID].tolist(), items[S.ITEM].tolist()))
        items = items.set_index(S.ITEM).sort_index()
        self.item_ids, self.titles = items[S.ITEM_ID].to_numpy(), items[S.TITLE].to_numpy()
        self.popular = pd.read_parquet(root / POPULAR_FILE)
        if list(info["dense_features"]) != list(DENSE_FEATURES):
            raise ValueError(
                f"bundle {root}: its DLRM reads {info['dense_features']}, the registry has {DENSE_FEATURES}"
            )
        mean_std = np.array([info["feature_stats"][f] for f in info["dense_features"]], dtype=np.float64)
        self.feature_mean, self.feature_std = mean_std[:, 0], mean_std[:, 1]

    @property
    def pool_size(self) -> int:
        return int(self.info["k"])

    def parse(self, frame: Any) -> list[Request]:
        types = dict(user_id_type=self.info["user_id_type"], item_id_type=self.info["item_id_type"])
        return parse_requests(frame, pool_size=self.pool_size, **types)

    def recommend(self, requests: Sequence[Request]) -> pd.DataFrame:
        """ANSWER_COLUMNS, each user's rows by rank (0 first). A user the tables do not hold and with no known
        recent item gets the popular items (fallback, stage "popular"); all others are scored as one batch."""
        return self.recommend_groups([requests])[0]

    def recommend_groups(self, groups: Sequence[Sequence[Request]]) -> list[pd.DataFrame]:
        """`recommend` of each group, every request of every group scored in one batch (a query's answer does
        not depend on the batch it is in: models.rows)."""
        queries = [self._resolve(r) for group in groups for r in group]
        live = [i for i, q in enumerate(queries) if q.user >= 0 or q.history_len > 0]
        scored = dict(zip(live, self._answers([queries[i] for i in live]))) if live else {}
        answers = [scored[i] if i in scored else self._popular(q) for i, q in enumerate(queries)]
        frames, lo = [], 0
        for group in groups:
            frames.append(self._frame(queries[lo : lo + len(group)], answers[lo : lo + len(group)]))
            lo += len(group)
        return frames

    def _resolve(self, request: Request) -> _Query:
        width = self.queries["history"].shape[1]
        user = self.user_of_id.get(request.user_id, -1)
        row = self.query_of_user[user] if user >= 0 else -1
        recent = [self.item_of_id[i] for i in request.recent_items if i in self.item_of_id]
        unknown = [i for i in request.recent_items if i not in self.item_of_id]
        if row >= 0:
            q = self.queries
            past = q["history"][row][: q["history_len"][row]].astype(np.int64)
            seen = q["exclude_indices"][q["exclude_indptr"][row] : q["exclude_indptr"][row + 1]]
            timestamp = int(q["timestamps"][row])
        else:
            user, past, seen, timestamp = (
                -1,
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
                self.info["default_timestamp"],
            )
        history = np.concatenate([np.asarray(recent[::-1], np.int64), past])[:width]
        padded = np.full(width, S.PAD_ID, dtype=np.int64)
        padded[: len(history)] = history
        seen = np.union1d(seen, np.asarray(recent, np.int64)).astype(np.int64)
        excluded = seen if request.exclude_seen else np.zeros(0, np.int64)
        return _Query(request, int(user), padded, len(history), timestamp, seen, excluded, unknown)

    def _popular(self, q: _Query) -> tuple[np.ndarray, np.ndarray, str]:
        from recsys_assets.serving.source_ids import POPULARITY

        top = self.popular.head(q.request.k)
        return top[S.ITEM].to_numpy(np.int64), top[POPULARITY].to_numpy(np.float64), POPULAR_STAGE

    def _frame(self, queries: list[_Query], answers: list[tuple[np.ndarray, np.ndarray, str]]) -> pd.DataFrame:
        """One table of every query's (items, scores, stage), in request order."""
        sizes = [len(items) for items, _, _ in answers]
        at = np.repeat(np.arange(len(queries)), sizes)
        items = np.concatenate([a[0] for a in answers]) if answers else np.zeros(0, np.int64)
        stages = np.repeat(np.array([a[2] for a in answers], dtype=object), sizes)
        return pd.DataFrame(
            {
                S.USER_ID: np.array([q.request.user_id for q in queries], dtype=object)[at],
                "rank": np.concatenate([np.arange(n, dtype=np.int32) for n in sizes])
                if sizes
                else np.zeros(0, np.int32),
                S.ITEM_ID: self.item_ids[items],
                S.TITLE: self.titles[items],
                "score": np.concatenate([a[1] for a in answers]).astype(np.float64) if answers else np.zeros(0),
                "stage": stages,
                "fallback": stages == POPULAR_STAGE,
                "unknown_recent_items": [list(queries[i].unknown_recent) for i in at],
            },
            columns=ANSWER_COLUMNS,
        )

    @torch.no_grad()
    def _answers(self, queries: list[_Query]) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """The funnel over the queries in one batch: each query's top k (items, DLRM scores, stage) in the served
        order: the DLRM's (ties: the pool rank), or the pool's where retrieval is served or the DLRM cannot score a
        new user."""
        pairs = self._pool(queries)
        dlrm = self._dlrm_scores(queries, pairs)
        qid, pool_rank = pairs[S.QUERY_ID].to_numpy(), pairs["pool_rank"].to_numpy()
        stage = self.info["served_stage"]
        by_dlrm = np.array([stage == "dlrm" and (q.user >= 0 or not self.dlrm_reads_user) for q in queries])
        order = np.lexsort((pool_rank, np.where(by_dlrm[qid], -dlrm, 0.0), qid))
        starts = np.searchsorted(qid[order], np.arange(len(queries) + 1))
        items = pairs[S.ITEM].to_numpy(np.int64)
        answers = []
        for i, q in enumerate(queries):
            top = order[starts[i] : starts[i + 1]][: q.request.k]
            answers.append((items[top], dlrm[top], stage if by_dlrm[i] or stage != "dlrm" else "retrieval"))
        return answers

    def _pool(self, queries: list[_Query]) -> pd.DataFrame:
        """The retrieval stage (serving.candidates' calls): the Two Tower's top k (exact or HNSW), merged with
        EASE's top k, every pair with both sources' scores and ranks; + the features' query columns."""
        from recsys_assets.data.ranker_features import BEST_SCORE_COLUMNS, QUERY_TIMESTAMP
        from recsys_assets.serving.candidates import candidate_pairs
        from recsys_assets.serving.item_item import merge_pools
        from recsys_assets.serving.retrieval import exact_top_k

        n = len(queries)
        history = np.stack([q.history for q in queries])
        history_len = np.array([q.history_len for q in queries], dtype=np.int64)
        users = np.array([q.user for q in queries], dtype=np.int64)
        qv = self.query_encoder(torch.as_tensor(users), torch.as_tensor(history), torch.as_tensor(history_len))
        ex_indptr, ex_indices = _csr([q.excluded for q in queries])
        states = _OnlineStates(
            np.where(users >= 0, users, self.num_users), np.arange(n), ex_indptr, ex_indices, np.full(n, -1)
        )
        k = self.pool_size
        if self.hnsw is not None:
            items, _ = self.hnsw.search(qv.numpy(), k, ex_indptr, ex_indices)
        else:
            items, _ = exact_top_k(qv, self.vectors, k, ex_indptr, ex_indices)
        sources: dict[str, Any] = {"item_item": None, "als": None}
        if self.ease is not None:
            sources["item_item"] = _SeenItemItemScores(self.ease, states, seen=_csr([q.seen for q in queries]))
            items = merge_pools(items, sources["item_item"].top(k), k, self.info["item_item_share"])
        [pairs] = candidate_pairs(ONLINE_PHASE, states, qv, self.vectors, [(items, None, "retrieved")], sources, k)
        pairs = pairs.reset_index(drop=True)
        at = pairs[S.QUERY_ID].to_numpy()
        pairs[QUERY_TIMESTAMP] = np.array([q.timestamp for q in queries], dtype=np.int64)[at]
        pairs[S.HISTORY] = list(history[at])
        # every pair is retrieved: each query's best score under a source is the max over its pairs (NaN: none),
        # as data.ranking computes it in Spark; given here, PairBatch skips its group-by
        starts = np.flatnonzero(np.r_[True, at[1:] != at[:-1]]) if len(at) else np.zeros(0, np.int64)
        counts = np.diff(np.r_[starts, len(at)])
        for column, best in BEST_SCORE_COLUMNS.items():
            values = pairs[column].to_numpy(np.float32)
            pairs[best] = np.repeat(np.fmax.reduceat(values, starts), counts) if len(at) else values
        return pairs

    def _dlrm_scores(self, queries: list[_Query], pairs: pd.DataFrame) -> np.ndarray:
        """The DLRM's logits of the pairs: the registry's features (standardized as the ranking dataset did) and
        the sparse columns data.ranking.model_columns writes. A new user's pairs score NaN when it reads user ids."""
        from recsys_assets.data.ranker_features import PairBatch, feature_matrix

        dense = feature_matrix(self.state, PairBatch.of(pairs))
        dense = ((dense - self.feature_mean) / self.feature_std).astype(np.float32)
        users = pairs[S.USER].to_numpy(np.int64)
        known = users < self.num_users
        items = pairs[S.ITEM].to_numpy(np.int64)
        history = np.stack(pairs[S.HISTORY].to_numpy())
        width = self.info["history_length"]
        history = np.pad(history[:, :width], ((0, 0), (0, max(0, width - history.shape[1]))), constant_values=S.PAD_ID)
        attributes = np.where(known[:, None], self.user_attributes[np.minimum(users, self.num_users - 1)], 0)
        batch = {
            S.DENSE: torch.from_numpy(dense),
            S.USER: torch.from_numpy(np.where(known, users, 0)),
            S.ITEM: torch.from_numpy(items),
            S.HISTORY: torch.from_numpy(history),
            S.CATEGORIES: torch.from_numpy(self._categories(items)),
            **{c: torch.from_numpy(attributes[:, j]) for j, c in enumerate(self.info["attribute_columns"])},
        }
        scores = self.dlrm(batch).numpy().astype(np.float32)
        return np.where(known | (not self.dlrm_reads_user), scores, np.nan)

    def _categories(self, items: np.ndarray) -> np.ndarray:
        """int64 [n, max_categories]: each item's categories, -1 padded (data.ranking.model_columns' pad)."""
        width = self.info["max_categories"]
        indptr, indices = self.state.category_indptr, self.state.category_indices
        out = np.full((len(items), width), S.PAD_ID, dtype=np.int64)
        for j in range(width):
            at = indptr[items] + j
            has = at < indptr[items + 1]
            out[has, j] = indices[at[has]]
        return out


@dataclasses.dataclass
class _SeenItemItemScores(QueryScores):
    """EASE scores of online queries: the input row is the items the user has seen, the masked items are the
    excluded ones (the same, unless the request asks to keep seen items)."""

    seen: tuple = (np.zeros(1, np.int64), np.zeros(0, np.int64))
    _computed: dict = dataclasses.field(default_factory=dict)

    def _scores(self, rows: np.ndarray) -> torch.Tensor:
        """Computed once per block: `top` and `lookup` both read them (the masking they apply is idempotent)."""
        key = (int(rows[0]), len(rows))
        if key not in self._computed:
            self._computed[key] = self.model.score_rows(self.seen[0], self.seen[1], rows).float()
        return self._computed[key]


# --------------------------------------------------------------------------------------------------- parity
PARITY_TOLERANCE = 1e-4


def batch_parity(
    scorer: TwoStageScorer, recommendations: pd.DataFrame, users: Sequence | None = None, batch_size: int = 1000
) -> dict[str, Any]:
    """The online answer (no recent items, each user's batch list length) against `recommendations` (the batch
    table, `source_ids.publish_recommendations`) for `users` (source ids; default: every user of the table):
    users, identical (same items in the same order, scores within PARITY_TOLERANCE), max_score_diff and the
    first mismatching users."""
    recs = recommendations.sort_values([S.USER_ID, "rank"], kind="stable")
    lists = {u: g for u, g in recs.groupby(S.USER_ID, sort=False)}
    users = list(lists) if users is None else list(users)
    identical, worst, mismatches = 0, 0.0, []
    for s in range(0, len(users), batch_size):
        chunk = users[s : s + batch_size]
        answer = scorer.recommend([Request(u, k=len(lists[u])) for u in chunk])
        for u, online in answer.groupby(S.USER_ID, sort=False):
            batch = lists[u]
            same = online[S.ITEM_ID].tolist() == batch[S.ITEM_ID].tolist()
            diff = float(np.abs(online["score"].to_numpy() - batch["dlrm_score"].to_numpy()).max()) if same else np.inf
            worst = max(worst, diff)
            if same and diff <= PARITY_TOLERANCE:
                identical += 1
            elif len(mismatches) < 10:
                mismatches.append(u)
    return {"users": len(users), "identical": identical, "max_score_diff": worst, "mismatches": mismatches}


def bundle_with_parity(out_dir: Path, *, parity_users: int, seed: int = 0, **bundle: Any) -> tuple[dict, dict]:
    """`build_bundle(out_dir, **bundle)`, then `batch_parity` of the loaded bundle against the batch table on
    `parity_users` users drawn with `seed` (0: every user). Returns (bundle.json, parity)."""
    from recsys_assets.serving.source_ids import RECOMMENDATIONS_FILE

    info = build_bundle(out_dir, **bundle)
    recs = pd.read_parquet(Path(bundle["recommendations_root"]) / RECOMMENDATIONS_FILE)
    users = recs[S.USER_ID].drop_duplicates()
    if 0 < parity_users < len(users):
        users = users.sample(parity_users, random_state=seed)
    return info, batch_parity(TwoStageScorer(out_dir), recs, users=users.tolist())


class MicroBatcher:
    """Scores concurrent calls together (a scoring server answers each request in its own thread). A call queues
    its requests; if no call is scoring, it becomes the scorer and scores everything queued, batch after batch,
    until the queue is empty; the others wait for their answer. While one batch is scored the next one gathers;
    a lone call is scored at once (no timer)."""

    def __init__(self, scorer: TwoStageScorer) -> None:
        import threading

        self.scorer = scorer
        self._queue: list[tuple[Sequence[Request], Any]] = []
        self._lock = threading.Lock()
        self._scoring = False

    def recommend(self, requests: Sequence[Request]) -> pd.DataFrame:
        from concurrent.futures import Future

        answer: Future = Future()
        with self._lock:
            self._queue.append((requests, answer))
            scorer, self._scoring = not self._scoring, True
        while scorer:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._scoring = scorer = False
                    break
            self._score(batch)
        return answer.result()

    def _score(self, batch: list[tuple[Sequence[Request], Any]]) -> None:
        try:
            frames = self.scorer.recommend_groups([requests for requests, _ in batch])
        except Exception as exc:  # every caller of the batch gets the error
            for _, waiting in batch:
                waiting.set_exception(exc)
        else:
            for (_, waiting), frame in zip(batch, frames):
                waiting.set_result(frame)
