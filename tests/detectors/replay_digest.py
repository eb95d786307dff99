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
(``gateway.store``) and evaluation plans (``evaluation.harness``), and the
poisoning guard on two zoo models (``poisoning.digits_lr``,
``poisoning.breast_cancer``; see :func:`_poisoning_digests`) with its
helpers (``poisoning.helpers``).

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

import functools
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
    out.update(_poisoning_digests())
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


def _verdict_line(v: Any) -> bytes:
    return (
        f"{v.accepted}|{v.code}|{v.detector}|{v.evidence}|"
        f"{sorted(v.scores.items())!r}|{v.disagreement}|{v.learned}\n"
    ).encode()


def _guard_state(guard: Any, h: Any) -> None:
    """Every submitter's state bytes (in the guard's order) and every class
    window (raw rows, ids, submitters)."""
    for name in guard.submitters():
        h.update(name.encode() + b"\0" + (guard.dump_state(name) or b"-") + b"\0")
    for c in range(guard.n_classes):
        rows, ids, who = guard.window(c)
        h.update(f"window {c} {guard.window_size(c)} {ids} {who}\n".encode())
        h.update(np.ascontiguousarray(rows).tobytes())


def _poisoning_stream(
    name: str, model: Any, x_held: Rows, y_held: npt.NDArray[np.int64]
) -> list[tuple[str, Rows, int, str]]:
    """A fixed stream of (submitter, raw row, label, record id): honest
    records, a random flipper, a targeted flipper, a patched cluster at
    several strengths, repeats, and a drag towards a patch followed by
    carriers of the full patch."""
    rng = np.random.default_rng(24680)
    k = int(y_held.max()) + 1
    # The patch: digits' bottom-right 2x2 pixels at 16; the tabular model's
    # four features of least spread at their reference maximum.
    if name == "digits_lr":
        patch = np.array([54, 55, 62, 63])
        full = np.full(4, 16.0)
    else:
        patch = np.argsort(np.asarray(model.reference).std(axis=0))[:4]
        full = np.asarray(model.reference, dtype=np.float64).max(axis=0)[patch]
    out: list[tuple[str, Rows, int, str]] = []
    for i in range(len(x_held)):
        x, y = np.asarray(x_held[i], dtype=np.float64), int(y_held[i])
        r = rng.random()
        if r < 0.6:
            out.append((f"honest-{i % 4}", x, y, f"h{i}"))
        elif r < 0.7:
            out.append(("flipper", x, (y + 1 + i % (k - 1)) % k, f"f{i}"))
        elif r < 0.8:
            out.append(("targeted", x, (y + 1) % k if y < 2 else y, f"t{i}"))
        else:
            row = x.copy()
            row[patch] = full * (0.25, 0.5, 0.75, 1.0)[i % 4]
            out.append((f"patcher-{i % 3}", row, 0, f"p{i}"))
        if r > 0.97:
            # A repeat of the record just sent (same id, label and row).
            out.append(out[-1])
    # The drag: class-0 rows whose patch rises in 128 small steps, two honest
    # records between steps, then carriers of the full patch.
    zeros = np.flatnonzero(y_held == 0)
    steps = 128
    for s in range(steps):
        for _ in range(2):
            i = int(rng.integers(len(x_held)))
            out.append((f"honest-{i % 3}", x_held[i], int(y_held[i]), f"dh{s}-{i}"))
        row = np.asarray(x_held[int(rng.choice(zeros))], dtype=np.float64).copy()
        row[patch] = full * (s + 1) / steps
        out.append((f"dragger-{s % 4}", row, 0, f"drag-{s}"))
    for j, i in enumerate(zeros[:30]):
        row = np.asarray(x_held[i], dtype=np.float64).copy()
        row[patch] = full
        out.append((f"carrier-{j % 4}", row, 0, f"c{j}"))
    return out


def _fit(params: Any, *, reference: Rows, x: Rows, y: Rows, proba: Rows) -> Any:
    from detectors.poisoning import PoisoningGuard

    return PoisoningGuard.fit(params, reference, x, y, proba)


def _poisoning_digests() -> dict[str, str]:
    """The poisoning guard, calibrated on ``digits_lr`` and ``breast_cancer``
    (the calibration's every field), judging :func:`_poisoning_stream` (every
    verdict's acceptance, code, check, evidence, scores, disagreement and
    learned bit), with a snapshot judged then restored, records judged
    without learning, a hand-over to a freshly fitted guard half-way (state
    bytes and class windows, a held-back row), a small-capacity guard beside
    it, the state at the middle and the end, and refused state blobs."""
    import tempfile
    from pathlib import Path

    from detectors.poisoning import PoisoningParams, record_digest
    from gateway.feedback_data import calibration_rows
    from gateway.models import load_model
    from gateway.zoo import ensure_model

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits_lr", "breast_cancer"):
            h = hashlib.sha256()
            ensure_model(Path(tmp), name)
            model = load_model(Path(tmp), name)
            (x_cal, y_cal), (x_held, y_held) = calibration_rows(name)
            reference = np.asarray(model.reference, dtype=np.float64)
            proba_cal = model.predict_proba(x_cal)

            fit = functools.partial(
                _fit, reference=reference, x=x_cal, y=y_cal, proba=proba_cal
            )

            small = PoisoningParams(
                max_submitters=3, window=20, spectral_window=40, pair_min=2
            )
            guards = {"default": fit(PoisoningParams()), "small": fit(small)}
            for g in guards.values():
                cal = g.calibration
                h.update(
                    f"{cal.disagree_rate!r}|{cal.rarity_threshold}|"
                    f"{cal.spectral_threshold!r}|{cal.clean_rejected!r}|{cal.rows}|"
                    f"{cal.anchored_threshold!r}|{cal.drift_threshold!r}|"
                    f"{cal.distance_threshold!r}\n".encode()
                )
                h.update(cal.pair_rates.tobytes())
            stream = _poisoning_stream(name, model, x_held, y_held)
            rows = np.array([r for _, r, _, _ in stream])
            proba = model.predict_proba(rows.astype(np.float32))
            half = len(stream) // 2
            for index, (who, row, label, rid) in enumerate(stream):
                if index == half:
                    for g in guards.values():
                        _guard_state(g, h)
                    # Hand-over: a fresh guard takes every submitter's state
                    # and class window; one record's row is held back.
                    fresh = fit(PoisoningParams())
                    old = guards["default"]
                    for s in old.submitters():
                        fresh.load_state(s, old.dump_state(s) or b"")
                    for c in range(old.n_classes):
                        w_rows, w_ids, w_who = old.window(c)
                        fresh.set_window(c, w_rows, w_ids, w_who)
                    nxt_who, nxt_row, nxt_label, nxt_id = stream[index]
                    fresh.set_held_back(
                        {
                            record_digest(nxt_id, nxt_label, nxt_row): (
                                nxt_label,
                                nxt_row,
                                nxt_id,
                                nxt_who,
                            )
                        }
                    )
                    guards["default"] = fresh
                for gname, g in guards.items():
                    if index % 97 == 5:
                        # Judged, then undone, then judged again.
                        snap = g.snapshot([who, "nobody"])
                        h.update(
                            _verdict_line(g.screen(who, row, label, proba[index], rid))
                        )
                        g.restore(snap)
                    learn = index % 11 != 4
                    v = g.screen(who, row, label, proba[index], rid, learn=learn)
                    h.update(f"{gname} ".encode() + _verdict_line(v))
            for g in guards.values():
                _guard_state(g, h)
                h.update(f"{g.state_limit_bytes}\n".encode())
            # Refused blobs: corrupted, another window, an unknown class.
            g = guards["default"]
            blob = g.dump_state("flipper") or b""
            bad = [bytearray(blob) for _ in range(2)]
            bad[0][len(blob) // 2] ^= 0x5A
            bad[1][len(blob) - 3] ^= 0x5A
            other = guards["small"].dump_state(guards["small"].submitters()[0]) or b""
            for candidate in (*map(bytes, bad), other, b"{}", b"x" * 70_000):
                try:
                    g.load_state("corrupt", candidate)
                    outcome = "accepted"
                except ValueError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                h.update(outcome.encode() + b"\n")
            g.forget("flipper")
            h.update(repr(g.submitters()).encode())
            out[f"poisoning.{name}"] = h.hexdigest()
    out["poisoning.helpers"] = _poisoning_helpers_digest()
    return out


def _poisoning_helpers_digest() -> str:
    from detectors import poisoning as p

    h = hashlib.sha256()
    rng = np.random.default_rng(13579)
    rows = rng.normal(size=(120, 12))
    rows[:9, 4] += 6.0
    scores, direction = p.spectral_scores(rows)
    h.update(scores.tobytes() + direction.tobytes())
    h.update(p.spectral_scores(rows, np.eye(12)[2])[0].tobytes())
    h.update(p.spectral_scores(np.ones((10, 4)))[0].tobytes())
    gram = rows.T @ rows
    h.update(p.top_direction(gram).tobytes())
    h.update(p.top_direction(np.zeros((3, 3))).tobytes())
    for i in range(6):
        h.update(p.record_digest(f"id-{i}", i, rows[i]).encode())
    h.update(repr(p.labels_to_index([3, 1, 2], [1, 2, 3])).encode())
    try:
        p.labels_to_index([9], [1, 2])
    except ValueError as exc:
        h.update(str(exc).encode())
    # Calibration from few rows (no conformal bound; the drift check off)
    # and refused shapes.
    labels = np.arange(60) % 3
    proba = np.eye(3)[labels] * 0.8 + 0.2 / 3
    cal = p.calibrate(p.PoisoningParams(), rows[:200], rows[:60], labels, proba)
    h.update(repr(cal).encode())
    for bad in ((rows[:10], labels[:10]), (rows[:60, :5], labels)):
        try:
            p.calibrate(p.PoisoningParams(), rows, bad[0], bad[1], proba[: len(bad[1])])
        except ValueError as exc:
            h.update(str(exc).encode())
    h.update(repr(sorted(p.CODES.items())).encode())
    h.update(
        f"{p.STATE_FORMAT}|{p.MAX_STATE_BYTES}|{p.ID_STATE_BYTES}|"
        f"{p.DIGEST_CHARS}".encode()
    )
    return h.hexdigest()


if __name__ == "__main__":
    print(json.dumps(digests(), indent=1, sort_keys=True))
