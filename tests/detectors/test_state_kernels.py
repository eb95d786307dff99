"""The compiled per-client helpers of ``detectors._state`` equal their plain
definitions: ``group_rows`` a stable sort by slot (both of its sorting
paths), ``push_window`` feeding each row's bit to its client's ring one at a
time (also from loaded states whose ring has wrapped), and
``SlotArena.slots`` the slot of each client, new or known."""

from __future__ import annotations

import numpy as np
import pytest

from detectors._state import FieldSpec, SlotArena, group_rows, push_window


@pytest.mark.parametrize("span", [1, 7, 300, 10**9, 2**61], ids=lambda s: f"span{s}")
def test_group_rows_is_a_stable_sort_by_slot(span: int) -> None:
    # A span wider than the batch takes the comparison sort, a narrow one
    # the counting sort, one whose keys would overflow int64 the merge sort;
    # negative slots are grouped like any others.
    rng = np.random.default_rng(span)
    for n in (0, 1, 2, 57, 500):
        slots = rng.integers(-span // 3, span, n)
        groups = group_rows(slots)
        order = np.argsort(slots, kind="stable")
        assert np.array_equal(groups.order, order)
        assert np.array_equal(groups.slot, slots[order])
        unique, start, size = np.unique(slots[order], True, return_counts=True)
        assert np.array_equal(groups.unique, unique)
        assert np.array_equal(groups.start, start)
        assert np.array_equal(groups.size, size)
        group = np.repeat(np.arange(len(unique)), size)
        assert np.array_equal(groups.group, group)
        assert np.array_equal(groups.position, np.arange(n) - start[group])
        for name in ("order", "slot", "position", "group", "unique", "start", "size"):
            assert getattr(groups, name).dtype == np.int64, name


def _one_at_a_time(
    ring: np.ndarray,
    pos: np.ndarray,
    length: np.ndarray,
    slots: np.ndarray,
    bits: np.ndarray,
) -> tuple[list[int], list[int]]:
    """Count and length after each row, pushing rows one by one in row order."""
    window = ring.shape[1]
    counts, lengths = [], []
    for slot, bit in zip(slots.tolist(), bits.tolist(), strict=True):
        p = int(pos[slot])
        ring[slot, p] = bit
        pos[slot] = (p + 1) % window
        length[slot] = min(int(length[slot]) + 1, window)
        filled = int(length[slot])
        cells = [(int(pos[slot]) - filled + j) % window for j in range(filled)]
        counts.append(int(ring[slot, cells].sum()))
        lengths.append(filled)
    return counts, lengths


def test_push_window_equals_pushing_one_row_at_a_time() -> None:
    rng = np.random.default_rng(8)
    for window in (1, 5, 50):
        n_slots = 9
        ring = rng.integers(0, 2, (n_slots, window)).astype(np.uint8)
        pos = rng.integers(0, window, n_slots)
        # Loaded states: full windows, empty ones and part-filled ones whose
        # filled cells wrap past the end of the ring.
        length = rng.integers(0, window + 1, n_slots)
        slots = rng.integers(0, n_slots, 3 * window + 20)
        bits = rng.random(len(slots)) < 0.4
        want_ring, want_pos, want_len = ring.copy(), pos.copy(), length.copy()
        counts, lengths = _one_at_a_time(want_ring, want_pos, want_len, slots, bits)

        groups = group_rows(slots)
        got_counts, got_lengths = push_window(
            ring, pos, length, groups, bits[groups.order]
        )
        inverse = np.empty(len(slots), dtype=np.int64)
        inverse[groups.order] = np.arange(len(slots))
        assert got_counts[inverse].tolist() == counts
        assert got_lengths[inverse].tolist() == lengths
        assert np.array_equal(pos, want_pos) and np.array_equal(length, want_len)
        # Only the filled cells are state; the rest are never read.
        for slot in range(n_slots):
            filled = int(want_len[slot])
            cells = [(int(want_pos[slot]) - filled + j) % window for j in range(filled)]
            assert np.array_equal(ring[slot, cells], want_ring[slot, cells])


def test_slots_allocates_new_clients_and_finds_known_ones() -> None:
    arena = SlotArena({"x": FieldSpec((), "<i8")}, initial_slots=2)
    first = arena.slots(["a", "b", "a"])
    assert first.tolist() == [0, 1, 0]
    # All known (the one-lookup path), one id alone, and new among known.
    assert arena.slots(["b", "a", "b"]).tolist() == [1, 0, 1]
    assert arena.slots(["b"]).tolist() == [1]
    assert arena.slots(["c", "a", "d", "c"]).tolist() == [2, 0, 3, 2]
    arena.release("a")
    assert arena.slots(["e", "b"]).tolist() == [0, 1]
    assert arena.slots([]).tolist() == []
    assert arena.clients() == ["b", "c", "d", "e"]
