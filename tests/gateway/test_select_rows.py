"""Which rows of a batch go to the shared fingerprint store."""

from __future__ import annotations

import numpy as np

from gateway.groups import FingerprintBatch, select_rows


def _batch(near: list[bool] | None, keys: list[int] | None) -> FingerprintBatch:
    n = len(near) if near is not None else len(keys or [])
    return FingerprintBatch(
        model="digits",
        client_ids=[f"c{i}" for i in range(n)],
        hashes=np.ones((n, 4), dtype=np.uint64),
        remember=[True] * n,
        match_threshold=2,
        input_keys=None if keys is None else np.array(keys, dtype=np.uint64),
        local_near=None if near is None else np.array(near, dtype=bool),
    )


def test_near_duplicates_and_sampled_keys_go_in_row_order() -> None:
    batch = _batch([False, True, False, False, True], [3, 5, 8, 16, 7])
    # Rows 1 and 4 are near-duplicates; rows 2 and 3 have keys divisible by 8.
    assert select_rows(batch, sample_every=8, max_rows=10).tolist() == [1, 2, 3, 4]


def test_the_cap_keeps_near_duplicates_before_the_sample() -> None:
    batch = _batch([False, True, False, True, True], [8, 1, 16, 3, 5])
    assert select_rows(batch, sample_every=8, max_rows=2).tolist() == [1, 3]
    assert select_rows(batch, sample_every=8, max_rows=4).tolist() == [0, 1, 3, 4]


def test_unknown_locality_or_keys_send_every_row_up_to_the_cap() -> None:
    assert select_rows(
        _batch(None, [1, 2, 3]), sample_every=8, max_rows=9
    ).tolist() == [
        0,
        1,
        2,
    ]
    every = _batch([False] * 4, None)
    assert select_rows(every, sample_every=8, max_rows=3).tolist() == [0, 1, 2]
    assert select_rows(
        _batch([False] * 3, [1, 2, 3]), sample_every=1, max_rows=9
    ).tolist() == [0, 1, 2]
