"""A seeded generator of interaction data with planted structure.

What is planted, so models have something to learn and tests can check that they learn it:
- users and items have latent factors; a user's choice follows ``u·v`` (taste),
- a strong sequential effect: the next item tends to be close to the previous one (``β · v_prev·v``), which is
  what a history-aware model can exploit and plain popularity cannot,
- long-tailed item popularity (Zipf bias on the logits),
- temporal drift: items are released over time and cannot be chosen before their release,
- multi-valued item categories that follow the item factors (the first one is the item's nearest prototype),
- user attributes that follow the user factors.
Pure numpy/pandas: the Spark side turns the frames into DataFrames.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

SIZES: dict[str, tuple[int, int, int]] = {
    # name: (num_users, num_items, mean interactions per user)
    "tiny": (200, 120, 30),
    "small": (1_000, 500, 40),
    "100k": (2_500, 1_500, 40),
    "1m": (12_500, 5_000, 80),
    "4m": (50_000, 4_000, 80),
}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    num_users: int = 1_000
    num_items: int = 500
    mean_interactions_per_user: int = 40
    num_categories: int = 12
    latent_dim: int = 8
    sequence_strength: float = 4.0  # β: weight of the previous item's similarity
    taste_strength: float = 1.5  # weight of u·v
    popularity_exponent: float = 1.0  # Zipf exponent of the popularity bias
    start_timestamp: int = 1_600_000_000
    duration_seconds: int = 365 * 24 * 3600
    seed: int = 0

    @classmethod
    def of_size(cls, size: str, **overrides) -> SyntheticSpec:
        if size not in SIZES:
            raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
        users, items, per_user = SIZES[size]
        return cls(num_users=users, num_items=items, mean_interactions_per_user=per_user, **overrides)


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    interactions: pd.DataFrame  # user, item, timestamp, rating (raw ids: int64, not contiguous)
    items: pd.DataFrame  # item, categories (list[str])
    users: pd.DataFrame  # user, age_group, region


# Raw ids are offset and strided so that the indexing step has real work to do (and id 0 is not special).
USER_ID_OFFSET, ITEM_ID_OFFSET, ITEM_ID_STRIDE = 1, 1_000, 7


def generate(spec: SyntheticSpec) -> SyntheticData:
    if spec.num_users < 1 or spec.num_items < 2 or spec.mean_interactions_per_user < 1:
        raise ValueError(f"synthetic spec needs users >= 1, items >= 2, interactions >= 1: {spec}")
    rng = np.random.default_rng(spec.seed)
    n_u, n_i, d = spec.num_users, spec.num_items, spec.latent_dim

    item_f = rng.normal(size=(n_i, d))
    item_f /= np.linalg.norm(item_f, axis=1, keepdims=True)
    user_f = rng.normal(size=(n_u, d)) / np.sqrt(d)
    popularity_rank = rng.permutation(n_i) + 1
    pop_bias = -spec.popularity_exponent * np.log(popularity_rank)
    # Items are released over the first 70% of the time range; 30% exist from the start.
    release = np.where(rng.random(n_i) < 0.3, 0.0, rng.uniform(0.0, 0.7, n_i))

    lengths = np.maximum(3, rng.poisson(spec.mean_interactions_per_user, n_u))
    lengths = np.minimum(lengths, n_i - 1)
    user_start = rng.uniform(0.0, 0.5, n_u)
    user_span = rng.uniform(0.3, 0.5, n_u)

    item_f32 = item_f.astype(np.float32)
    users_out, items_out, times_out, ratings_out = [], [], [], []
    chunk = max(1, 4_000_000 // n_i)  # bound the (users × items) logits matrix
    for lo in range(0, n_u, chunk):
        hi = min(n_u, lo + chunk)
        u_idx = np.arange(lo, hi)
        taste = (spec.taste_strength * (user_f[u_idx] @ item_f.T) + pop_bias).astype(np.float32)  # [b, n_i]
        seen = np.zeros((hi - lo, n_i), dtype=bool)
        prev = None
        max_len = lengths[u_idx].max()
        # Sorted uniform offsets give each user increasing times within their active span.
        offsets = np.sort(rng.random((hi - lo, max_len)), axis=1)
        for step in range(max_len):
            active = step < lengths[u_idx]
            t = user_start[u_idx] + user_span[u_idx] * offsets[:, step]
            # Gumbel-max sampling, in float32 and in place: this loop is the generator's whole cost.
            logits = rng.random(taste.shape, dtype=np.float32)
            np.maximum(logits, np.float32(1e-12), out=logits)
            np.log(logits, out=logits)
            np.negative(logits, out=logits)
            np.log(logits, out=logits)
            np.subtract(taste, logits, out=logits)
            if prev is not None:
                logits += spec.sequence_strength * (item_f32[prev] @ item_f32.T)
            logits[seen] = -np.inf
            logits[release[None, :] > t[:, None]] = -np.inf
            choice = np.argmax(logits, axis=1)
            # A user with nothing left to choose (all released items seen) stops early.
            active &= np.isfinite(logits[np.arange(hi - lo), choice])
            rows = np.nonzero(active)[0]
            seen[rows, choice[rows]] = True
            affinity = (user_f[u_idx[rows]] * item_f[choice[rows]]).sum(axis=1) * np.sqrt(d)
            users_out.append(u_idx[rows])
            items_out.append(choice[rows])
            times_out.append(t[rows])
            ratings_out.append(np.clip(np.round(3.5 + affinity + rng.normal(0, 0.5, len(rows))), 1, 5))
            prev = choice if prev is None else np.where(active, choice, prev)

    users = np.concatenate(users_out)
    items = np.concatenate(items_out)
    timestamps = spec.start_timestamp + (np.concatenate(times_out) * spec.duration_seconds).astype(np.int64)
    interactions = pd.DataFrame(
        {
            "user": users.astype(np.int64) + USER_ID_OFFSET,
            "item": items.astype(np.int64) * ITEM_ID_STRIDE + ITEM_ID_OFFSET,
            "timestamp": timestamps,
            "rating": np.concatenate(ratings_out).astype(np.float64),
        }
    ).sort_values(["user", "timestamp", "item"], kind="stable", ignore_index=True)

    prototypes = rng.normal(size=(spec.num_categories, d))
    nearest = np.argsort(-(item_f @ prototypes.T), axis=1)
    extra = rng.integers(0, 3, n_i)  # 0..2 further categories, like multi-genre movies
    categories = [[f"genre_{c}" for c in nearest[i, : 1 + extra[i]]] for i in range(n_i)]
    items_df = pd.DataFrame(
        {"item": np.arange(n_i, dtype=np.int64) * ITEM_ID_STRIDE + ITEM_ID_OFFSET, "categories": categories}
    )
    age_cut = np.quantile(user_f[:, 0], [0.2, 0.4, 0.6, 0.8])
    users_df = pd.DataFrame(
        {
            "user": np.arange(n_u, dtype=np.int64) + USER_ID_OFFSET,
            "age_group": np.array(["18-24", "25-34", "35-44", "45-54", "55+"])[np.searchsorted(age_cut, user_f[:, 0])],
            "region": np.array(["north", "south", "east", "west"])[
                (user_f[:, 1] > 0).astype(int) * 2 + (user_f[:, 2] > 0).astype(int)
            ],
        }
    )
    return SyntheticData(interactions=interactions, items=items_df, users=users_df)
