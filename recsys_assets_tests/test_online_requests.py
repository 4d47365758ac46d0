"""Requests to the online funnel, parsed as MLflow hands them to `predict` (a pandas table from JSON records):
defaults, the source's id types, and errors that name the field and the row. The model itself: test_online_serving."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from recsys_assets.models.rows import MIN_ROWS, with_min_rows
from recsys_assets.serving.online import DEFAULT_K, Request, RequestError, parse_requests


def _parse(records: list[dict], id_type: str = "int64") -> list[Request]:
    return parse_requests(pd.DataFrame(records), pool_size=100, user_id_type=id_type, item_id_type=id_type)


def test_defaults_and_integer_ids_as_json_gives_them():
    # a missing k in one record makes pandas hold the column as float: 5.0 is still the integer 5
    [a, b] = _parse([{"user_id": 7, "k": 5}, {"user_id": "8", "recent_items": [1, "2"], "exclude_seen": False}])
    assert a == Request(7, (), 5, True)
    assert b == Request(8, (1, 2), DEFAULT_K, False)


def test_string_ids_stay_strings():
    [r] = _parse([{"user_id": 12, "recent_items": ["a", 3]}], id_type="string")
    assert r.user_id == "12" and r.recent_items == ("a", "3")


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"k": 3}], "'user_id' is missing"),
        ([{"user_id": 1}, {"user_id": None}], "row 1: field 'user_id' is missing"),
        ([{"user_id": 1.5}], "'user_id' must be an integer"),
        ([{"user_id": True}], "'user_id' must be an integer"),
        ([{"user_id": 1, "k": 101}], "'k' must be an integer from 1 to 100"),
        ([{"user_id": 1, "k": 2.5}], "'k' must be an integer from 1 to 100"),
        ([{"user_id": 1, "recent_items": 5}], "'recent_items' must be a list"),
        ([{"user_id": 1, "recent_items": [1, [2]]}], "'recent_items'[1] must be an integer"),
        ([{"user_id": 1, "exclude_seen": 1}], "'exclude_seen' must be true or false"),
        ([{"user_id": 1, "users": 2}], "unknown request field(s) ['users']"),
    ],
)
def test_a_bad_request_names_its_field(records, message):
    with pytest.raises(RequestError) as info:
        _parse(records)
    assert message in str(info.value)


def test_an_empty_request_is_refused():
    with pytest.raises(RequestError, match="1 to"):
        parse_requests(pd.DataFrame({"user_id": []}), pool_size=10, user_id_type="int64", item_id_type="int64")


def test_products_of_few_rows_equal_the_same_rows_in_a_batch():
    """One query scored alone gets the bits it gets in a batch (models/rows.py): without the padding, BLAS's
    matrix-vector kernel sums in another order."""
    gen = torch.Generator().manual_seed(0)
    queries, items = torch.randn(300, 64, generator=gen), torch.randn(5000, 64, generator=gen)
    batch = queries @ items.T
    for n in (1, 2, 3, MIN_ROWS):
        alone = with_min_rows(lambda q: q @ items.T, queries[:n])
        assert alone.shape == (n, 5000) and torch.equal(alone, batch[:n])
    assert with_min_rows(lambda q: q @ items.T, queries[:0]).shape == (0, 5000)


class _GatedScorer:
    """Answers each request with its user id; its first batch waits on `gate`, so calls made meanwhile queue."""

    def __init__(self) -> None:
        import threading

        self.gate, self.started, self.batches = threading.Event(), threading.Event(), []

    def recommend_groups(self, groups):
        self.started.set()
        self.gate.wait(timeout=60)
        self.batches.append(len(groups))
        if any(r.user_id == "boom" for g in groups for r in g):
            raise ValueError("boom")
        return [pd.DataFrame({"user_id": [r.user_id for r in g]}) for g in groups]


def test_concurrent_calls_are_scored_in_one_batch_each_with_its_own_answer():
    import threading
    import time

    from recsys_assets.serving.online import MicroBatcher

    scorer = _GatedScorer()
    batcher = MicroBatcher(scorer)
    answers: dict = {}

    def call(user):
        try:
            answers[user] = batcher.recommend([Request(user)])["user_id"].tolist()
        except ValueError as exc:
            answers[user] = str(exc)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert scorer.started.wait(timeout=60)  # the first call is scoring: the next ones queue
    others = [threading.Thread(target=call, args=(u,)) for u in (1, 2, 3)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 60
    while len(batcher._queue) < 3:  # a condition, not a race: every call has queued
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scorer.gate.set()
    for t in [first, *others]:
        t.join(timeout=60)
    assert scorer.batches == [1, 3] and not batcher._scoring
    assert answers == {0: [0], 1: [1], 2: [2], 3: [3]}
    call("boom")  # a batch that fails gives its callers the error, and the next call is scored again
    call(4)
    assert answers["boom"] == "boom" and answers[4] == [4] and scorer.batches == [1, 3, 1, 1]
