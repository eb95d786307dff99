"""A digest of everything the detectors say and keep over one seeded replay,
for checking that a refactoring (moving code between modules) changed no
behaviour: run it before and after, and compare the digests.

``python -m tests.detectors.replay_digest`` prints one SHA-256 per part:
each registered detector (every score's repr, threshold, flag, warm bit and
evidence sentence, per batch; every client's state bytes and the live
baseline at the middle and the end; the refusal of a corrupted state blob),
the fingerprint detector again behind a store that is not the in-memory one
(the protocol path, and the matches per row), the detectors' public helper
functions on fixed inputs, and the gateway's admission arithmetic
(``gateway.store``) and evaluation plans (``evaluation.harness``).

The stream: digits (scaled to [0, 1]) from honest clients with
near-duplicate runs, uniform random queries, a probing walk of tiny steps
and a sweep, with arrival times at several paces, a stand-in model's answers
after each batch, answers' outcomes and times, and a learn mask that stops
two clients from teaching the baselines. Half-way, every client's state and
every live baseline move into fresh detectors (``load_state``,
``import_baseline``), which finish the stream.

The digests depend on the machine's floating point (numpy's vector paths,
the CPU numba compiles for), so they are compared on one machine, before
and after a change; they are not a recording to pin in a test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float64]
BATCH_SIZES = (1, 7, 300, 2, 64, 500, 5, 128, 33)


class _ProtocolStore:
    """The in-memory store seen through the protocol only, so the detector
    takes its path for stores other than the in-memory one."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: npt.NDArray[np.uint64],
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> list[Any]:
        return list(self._inner.observe(client_ids, hash_sets, remember, input_keys))


def _stream() -> tuple[list[str], Rows, Rows, Rows, Rows]:
    """Client ids, rows, arrival times, reference rows and model weights."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(97531)
    X = np.asarray(load_digits().data, dtype=np.float64) / 16.0
    order = rng.permutation(len(X))
    reference, pool = X[order[:1000]], X[order[1000:]]
    weights = rng.normal(0.0, 1.0, (X.shape[1], 10))
    streams: dict[str, list[Rows]] = {}
    for c in range(12):
        rows: list[Rows] = []
        length = int(rng.integers(30, 250))
        while len(rows) < length:
            row = pool[rng.integers(len(pool))]
            rows.append(row)
            if rng.random() < 0.15:
                copies = int(rng.integers(2, 11))
                noise = rng.normal(0.0, 0.01, (copies, len(row)))
                rows.extend(np.clip(row + noise, 0.0, 1.0))
        streams[f"honest-{c}"] = rows
    for c in range(3):
        streams[f"uniform-{c}"] = list(rng.random((int(rng.integers(80, 260)), 64)))
    for c in range(3):
        start = pool[rng.integers(len(pool))]
        steps = rng.normal(0.0, 0.004, (int(rng.integers(100, 300)), 64))
        streams[f"probe-{c}"] = list(np.clip(start + np.cumsum(steps, axis=0), 0, 1))
    streams["sweep-0"] = list(reference[np.argsort(reference[:, 20])][::4][:200])
    names = [name for name, rows in streams.items() for _ in rows]
    names = [names[i] for i in rng.permutation(len(names))]
    cursor = dict.fromkeys(streams, 0)
    ordered = []
    for name in names:
        ordered.append(streams[name][cursor[name]])
        cursor[name] += 1
    # Arrival times: honest clients at uneven gaps, the rest paced.
    clock = dict.fromkeys(streams, 1_000_000.0)
    times = []
    for name in names:
        gap = rng.exponential(0.7) if name.startswith("honest") else 0.025
        clock[name] += gap
        times.append(clock[name])
    return names, np.asarray(ordered), np.asarray(times), reference, weights


def _answers(X: Rows, weights: Rows) -> Rows:
    logits = (X - 0.3) @ weights
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _batches(n: int) -> Iterator[slice]:
    start, i = 0, 0
    while start < n:
        size = BATCH_SIZES[i % len(BATCH_SIZES)]
        yield slice(start, min(start + size, n))
        start += size
        i += 1


def _build(reference: Rows, weights: Rows) -> dict[str, Any]:
    from detectors.fingerprint import FingerprintDetector, InMemoryFingerprintStore
    from detectors.registry import build_detectors

    detectors: dict[str, Any] = dict(build_detectors({}, seed=5))
    p = detectors["fingerprint"].params
    inner = InMemoryFingerprintStore(
        match_threshold=p.match_threshold,
        horizon=p.horizon,
        max_hashes=p.max_hashes,
        entries_per_hash=p.entries_per_hash,
    )
    detectors["fingerprint-protocol"] = FingerprintDetector(
        seed=5, store=_ProtocolStore(inner)
    )
    proba = _answers(reference, weights)
    for detector in detectors.values():
        detector.learn_baseline(reference)
        detector.learn_output_baseline(reference, proba)
    return detectors


def _snapshot(detectors: dict[str, Any], parts: dict[str, Any]) -> None:
    for name, detector in detectors.items():
        h = parts[name]
        for client in detector.clients():
            blob = detector.dump_state(client)
            h.update(client.encode() + b"\0" + (blob or b"-") + b"\0")
        h.update(b"baseline\0" + (detector.export_baseline() or b"-") + b"\0")


def digests() -> dict[str, str]:
    """One hex SHA-256 per part (see the module docstring)."""
    ids, X, times, reference, weights = _stream()
    learn_all = np.array([not i.startswith(("uniform-1", "probe-2")) for i in ids])
    detectors = _build(reference, weights)
    parts = {name: hashlib.sha256() for name in detectors}
    slices = list(_batches(len(ids)))
    half = len(slices) // 2
    for index, part in enumerate(slices):
        if index == half:
            _snapshot(detectors, parts)
            fresh = _build(reference, weights)
            for name, detector in detectors.items():
                for client in detector.clients():
                    blob = detector.dump_state(client)
                    assert blob is not None
                    migrated = fresh[name].load_state(client, blob)
                    parts[name].update(f"migrated {migrated}\0".encode())
                baseline = detector.export_baseline()
                if baseline is not None:
                    imported = fresh[name].import_baseline(baseline)
                    parts[name].update(f"imported {imported}\0".encode())
            detectors = fresh
        batch_ids, rows, learn = ids[part], X[part], learn_all[part]
        proba = _answers(rows, weights)
        errored = np.array([i % 13 == 0 for i in range(len(batch_ids))])
        rejected = np.array([i % 17 == 3 for i in range(len(batch_ids))])
        for name, detector in detectors.items():
            h = parts[name]
            scores = detector.score_batch(
                batch_ids, rows, learn=learn, arrival_s=times[part]
            )
            for s in scores:
                h.update(
                    f"{s.detector}|{s.score!r}|{s.threshold!r}|{s.flagged}|"
                    f"{s.warm}|{s.evidence}\n".encode()
                )
            detector.observe_outputs(batch_ids, rows, proba, learn=learn)
            detector.observe_outcomes(
                batch_ids, errored, rejected, answered_s=times[part] + 0.004
            )
            if name.startswith("fingerprint"):
                for m in detector.last_matches:
                    h.update(
                        f"{m.own}|{sorted(m.others.items())}|{m.identical}\n".encode()
                    )
                h.update(detector.last_hashes.tobytes())
                h.update(detector.last_input_keys.tobytes())
    _snapshot(detectors, parts)
    # A corrupted blob of each detector: the refusal's type and message.
    for name, detector in detectors.items():
        client = detector.clients()[0]
        blob = bytearray(detector.dump_state(client) or b"")
        for at in (len(blob) // 2, len(blob) - 3):
            bad = bytearray(blob)
            bad[at] ^= 0x5A
            try:
                detector.load_state("corrupt", bytes(bad))
                outcome = "accepted"
            except ValueError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            parts[name].update(outcome.encode() + b"\n")
    out = {name: h.hexdigest() for name, h in parts.items()}
    out["helpers"] = _helpers_digest(reference)
    out["gateway.store"] = _store_digest()
    out["evaluation.harness"] = _harness_digest()
    return out


def _helpers_digest(reference: Rows) -> str:
    from detectors import coverage, fingerprint
    from detectors.base import DetectorScore

    h = hashlib.sha256()
    centres = coverage.kmeans(reference, 16, 15, 3)
    counts = np.bincount(coverage.assign(reference, centres), minlength=16)
    h.update(centres.tobytes() + counts.tobytes())
    h.update(coverage.expected_coverage(counts.astype(np.float64), 64).tobytes())
    h.update(coverage.coverage_sd(counts.astype(np.float64), 64).tobytes())
    hashes = fingerprint.window_hashes(reference[:50], levels=4, width=6, seed=2)
    h.update(hashes.tobytes())
    h.update(fingerprint.top_hashes(hashes, 16).tobytes())
    h.update(fingerprint.top_hashes(hashes, 70, np.sort(hashes[0])).tobytes())
    h.update(fingerprint.input_keys(reference[:50]).tobytes())
    score = DetectorScore("x", 0.5, 0.4, True, lambda row: f"row {row}", True, 3)
    h.update(f"{score!r}|{score == score}|{hash(score) == hash(score)}".encode())
    return h.hexdigest()


def _store_digest() -> str:
    from gateway.config import Settings
    from gateway.store import (
        AdmitItem,
        apply_overrides,
        check_client_id,
        compile_plan,
        gcra,
    )

    h = hashlib.sha256()
    tat: float | None = None
    for step in range(40):
        d = gcra(tat, step * 30_000.0, rate_per_s=20.0, burst=4, cost=1 + step % 2)
        tat = d.tat_us if d.allowed else tat
        h.update(repr(d).encode())
    limits = Settings().limits
    for overrides in ("", '{"count_refused": true}', "[1]", '{"nope": 1}'):
        try:
            plan = apply_overrides(limits.plan("default"), overrides)
            h.update(repr(compile_plan(limits, plan)).encode())
        except ValueError as exc:
            h.update(f"{type(exc).__name__}: {exc}".encode())
    for client in ("ok-client", "bad:client", "{c:x}"):
        try:
            check_client_id(client)
            AdmitItem(client, "r", "0:1", rate_per_s=5.0, burst=2, cost=3)
            h.update(b"accepted")
        except ValueError as exc:
            h.update(f"{type(exc).__name__}: {exc}".encode())
    return h.hexdigest()


def _harness_digest() -> str:
    from evaluation.harness import EvalPlan

    h = hashlib.sha256()
    for quick in (True, False):
        for budget in (None, 50):
            for arrivals in ("paced", "poisson"):
                plan = EvalPlan.build(
                    quick=quick,
                    n_benign=60,
                    budget=budget,
                    rate_limit_per_s=30.0,
                    attacker_arrivals=arrivals,
                )
                h.update(repr(plan).encode())
    try:
        EvalPlan.build(
            quick=True,
            n_benign=3,
            budget=None,
            rate_limit_per_s=1.0,
            attacker_arrivals="bursty",
        )
    except ValueError as exc:
        h.update(str(exc).encode())
    return h.hexdigest()


if __name__ == "__main__":
    print(json.dumps(digests(), indent=1, sort_keys=True))
