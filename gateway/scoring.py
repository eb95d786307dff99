"""The CPU half of a batch: detectors, policy and the model, per model served.

``Scorer`` owns every per-client state a worker keeps in memory (detector
states and the policy's memory of flags) and can hand it over as bytes when a
client moves to another worker. It does no I/O, so the worker runs it in an
executor thread and the event loop stays free for Kafka heartbeats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import msgspec
import numpy as np

from detectors import Detector, DetectorScore, build_detectors
from detectors.calibration import Calibration, calibrate
from detectors.fingerprint import FingerprintDetector, FingerprintParams
from detectors.ood import OutOfDistributionDetector
from detectors.region import RegionMap
from gateway.backends import ModelBackend
from gateway.batch import BatchItem
from gateway.config import CrossClientConfig, PolicyConfig, Settings
from gateway.errors import BackendError, PolicyError, ValidationError
from gateway.groups import FingerprintBatch, RegionBatch
from gateway.metrics import WorkerMetrics
from gateway.policy import SEVERITY, Policy
from gateway.shaping import seed_for, shape
from gateway.validation import FeatureScale, feature_scale

logger = logging.getLogger(__name__)

_POLICY_KEY = "_policy"


class Scorer:
    """Detectors per model plus one policy, over the clients of one worker.

    Parameters
    ----------
    settings
        ``detectors`` holds per-detector parameter overrides; ``policy`` the
        ladder.
    models
        The models served; each gets its own detector set, whose shared
        baseline is seeded with the model's reference sample.
    metrics
        Where detector score distributions are recorded.
    """

    def __init__(
        self,
        settings: Settings,
        models: dict[str, ModelBackend],
        metrics: WorkerMetrics,
    ) -> None:
        self.models = models
        self.policy = Policy(settings.policy)
        self._metrics = metrics
        self._detectors: dict[str, dict[str, Detector[Any]]] = {}
        # Detectors in shadow: scored and recorded, but kept out of policy.
        # Fingerprints of the last scoring call, for the cross-worker store.
        self._fingerprints: list[FingerprintBatch] = []
        # Region maps per model (detectors.region) and the counted rows of the
        # last scoring call, for the cross-worker region store.
        self._region_maps: dict[str, RegionMap] = {}
        self._regions: list[RegionBatch] = []
        cross = settings.cross_client
        self._region_min_share = cross.region_min_client_share
        self._regions_on = cross.enabled and cross.region_enabled
        # Per model: where the detectors put each feature (per-feature scales
        # from the reference when the declared range does not describe the
        # features, gateway.validation.feature_scale) and the detector
        # parameters calibrated on that model's reference sample
        # (detectors.calibration), merged over the operator's overrides.
        self._scales: dict[str, FeatureScale] = {}
        self.calibrations: dict[str, Calibration] = {}
        for name, model in models.items():
            scale = feature_scale(model.signature, model.reference)
            reference = scale.apply(model.reference)
            overrides = fit_to_features(settings.detectors, reference.shape[1], name)
            calibration = _calibrated(overrides, reference)
            params = {
                d: {**overrides.get(d, {}), **calibration.params.get(d, {})}
                for d in set(overrides) | set(calibration.params)
            }
            detectors = build_detectors(params, seed=0)
            for detector in detectors.values():
                detector.learn_baseline(reference)
            self._scales[name] = scale
            self.calibrations[name] = calibration
            if any(d.observes_outputs for d in detectors.values()):
                _learn_outputs(detectors, model, reference)
            self._detectors[name] = detectors
            if cross.enabled and cross.region_enabled:
                self._region_maps[name] = RegionMap(
                    n_components=cross.region_components,
                    cell_sd=cross.region_cell_sd,
                    rare_share=cross.region_rare_share,
                ).fit(reference)
            logger.info(
                "detectors calibrated",
                extra={
                    "model": name,
                    "scale": scale.source,
                    "params": calibration.params,
                    "seconds": round(calibration.seconds, 3),
                },
            )

    def score_and_predict(self, items: Sequence[BatchItem]) -> None:
        """Score every admitted item, apply policy, and run each model once on
        the rows policy lets through. Fills ``verdict``, ``scores``, ``action``
        and ``probabilities`` (or ``error``) in place."""
        self._fingerprints = []
        self._regions = []
        by_model: dict[str, list[BatchItem]] = defaultdict(list)
        for item in items:
            if item.error is None and item.model is not None and item.rows is not None:
                by_model[item.model.name].append(item)

        for model_name, model_items in by_model.items():
            model = self.models[model_name]
            # A redelivered record (the worker died or the batch was retried
            # after answering it) was scored the first time; scoring it again
            # would count its flags twice and show the detectors an exact copy
            # of a query, which looks like probing.
            fresh = [
                i
                for i in model_items
                if i.admission is None or i.admission.outcome != "redelivery"
            ]
            if fresh:
                self._score(model, fresh)
            for item in model_items:
                if (
                    item.admission is not None
                    and item.admission.outcome == "redelivery"
                ):
                    # Not scored again, but held to what the client has earned.
                    item.verdict = self.policy.standing(
                        item.client_id or "",
                        model=model.name,
                        plan=item.key.plan if item.key is not None else None,
                    )
                    _apply_verdict(item)

            # One model call for every row policy lets through.
            served = [i for i in model_items if i.error is None and i.rows is not None]
            if not served:
                continue
            rows = np.concatenate([i.rows for i in served if i.rows is not None])
            started = time.perf_counter()
            try:
                proba = model.predict_proba(rows)
            except BackendError as exc:
                self._metrics.backend_errors.labels(
                    model_name, model.kind, exc.code
                ).inc()
                for item in served:
                    item.fail(exc)
                continue
            finally:
                self._metrics.backend_seconds.labels(model_name, model.kind).observe(
                    time.perf_counter() - started
                )
            served, rows, proba = self._drop_non_finite(model, served, rows, proba)
            start = 0
            for item in served:
                n = len(item.rows) if item.rows is not None else 0
                item.probabilities = self._shaped(item, proba[start : start + n])
                start += n
            if served:
                self._observe_outputs(model, served, rows, proba)
        self._observe_outcomes(items)

    def _score(self, model: ModelBackend, items: list[BatchItem]) -> None:
        # One matrix of every row of the batch, in arrival order, so that each
        # detector updates each client's state in the order the queries came.
        row_items = [i for i in items if i.rows is not None for _ in range(len(i.rows))]
        x = self._scales[model.name].apply(
            np.concatenate([i.rows for i in items if i.rows is not None])
        )
        client_ids = [i.client_id or "" for i in row_items]
        learn = [self.policy.good_standing(c) for c in client_ids]
        now_s = time.time()
        arrival_s = np.array([i.arrived_s or now_s for i in row_items])
        per_detector: dict[str, list[DetectorScore]] = {
            name: detector.score_batch(client_ids, x, learn=learn, arrival_s=arrival_s)
            for name, detector in self._detectors[model.name].items()
        }
        for detector in self._detectors[model.name].values():
            if isinstance(detector, FingerprintDetector):
                self._fingerprints.append(
                    FingerprintBatch(
                        model=model.name,
                        client_ids=client_ids,
                        hashes=detector.last_hashes,
                        remember=[True] * len(client_ids),
                        match_threshold=detector.params.match_threshold,
                        input_keys=detector.last_input_keys,
                        local_near=np.fromiter(
                            (
                                m.own > 0 or bool(m.others)
                                for m in detector.last_matches
                            ),
                            dtype=bool,
                            count=len(client_ids),
                        ),
                    )
                )

        self._note_regions(model.name, client_ids, x)

        # Policy per row, in arrival order, with each detector's contributions
        # computed for the whole batch at once (Policy.decide_batch).
        columns = list(per_detector.values())
        verdicts = self.policy.decide_batch(
            client_ids,
            columns,
            model=model.name,
            plans=[i.key.plan if i.key is not None else None for i in row_items],
        )

        # Per detector, not per row and detector: the largest score of each
        # request's rows, and the score histogram, from one array each.
        self._record_scores(items, columns, len(row_items))

        # A request takes the most severe verdict of its rows.
        actions: Counter[tuple[str, str]] = Counter()
        for item, verdict in zip(row_items, verdicts, strict=True):
            current = item.verdict
            if (
                current is None
                or SEVERITY[verdict.enforced] > SEVERITY[current.enforced]
                or (
                    SEVERITY[verdict.enforced] == SEVERITY[current.enforced]
                    and SEVERITY[verdict.action] > SEVERITY[current.action]
                )
            ):
                item.verdict = verdict
            actions[(verdict.action, "true" if verdict.shadow else "false")] += 1

        for (action, shadow), count in actions.items():
            self._metrics.policy_actions.labels(action, shadow).inc(count)
        for item in items:
            _apply_verdict(item)

    def _record_scores(
        self,
        items: list[BatchItem],
        columns: list[list[DetectorScore]],
        n_rows: int,
    ) -> None:
        """Each item's largest score per detector (at least 0) into
        ``item.scores``, and every score over its threshold (capped at 1)
        into the detector's histogram."""
        if any(len(column) != n_rows for column in columns):
            raise ValueError(f"a detector did not score each of {n_rows} rows")
        if not columns or not n_rows:
            return
        names = [column[0].detector for column in columns]
        score = np.empty((len(columns), n_rows), dtype=np.float64)
        for j, column in enumerate(columns):
            score[j] = np.fromiter(map(itemgetter(1), column), np.float64, n_rows)
            threshold = np.fromiter(map(itemgetter(2), column), np.float64, n_rows)
            judged = threshold > 0
            _observe_many(
                self._metrics.detector_score.labels(names[j]),
                np.minimum(score[j][judged] / threshold[judged], 1.0),
            )

        counts = [len(i.rows) if i.rows is not None else 0 for i in items]
        uniform = len(set(names)) == len(names) and all(
            len(set(map(itemgetter(0), column))) == 1 for column in columns
        )
        if not uniform or 0 in counts or any(i.scores for i in items):
            # Rare (a detector reporting under several names, an empty request,
            # scores already there): row by row, as the max of everything.
            start = 0
            for item, n in zip(items, counts, strict=True):
                for column in columns:
                    for s in column[start : start + n]:
                        item.scores[s.detector] = max(
                            item.scores.get(s.detector, 0.0), s.score
                        )
                start += n
            return
        # The max over each request's rows, then at least 0 (what starts
        # item.scores); -0.0 becomes 0.0 as max(0.0, -0.0) does.
        if n_rows != len(items):
            starts = np.cumsum([0, *counts[:-1]])
            score = np.maximum.reduceat(score, starts, axis=1)
        score = np.where(score > 0, score, 0.0)
        for item, values in zip(items, score.T.tolist(), strict=True):
            item.scores.update(zip(names, values, strict=True))

    def _drop_non_finite(
        self,
        model: ModelBackend,
        served: list[BatchItem],
        rows: np.ndarray,
        proba: np.ndarray,
    ) -> tuple[list[BatchItem], np.ndarray, np.ndarray]:
        """Fail the requests whose answer holds NaN or infinity; the rest,
        their rows and answers. A model can overflow on inputs its declared
        range lets through; such an answer must not reach the client, nor the
        detectors, which refuse it, and it must not fail the other requests
        of the batch."""
        finite = np.isfinite(proba).all(axis=1)
        if finite.all():
            return served, rows, proba
        kept: list[BatchItem] = []
        # A request is answered whole or not at all, so a request with one
        # bad row drops its good rows too.
        keep_rows = np.zeros(len(finite), dtype=bool)
        start = 0
        for item in served:
            n = len(item.rows) if item.rows is not None else 0
            if finite[start : start + n].all():
                kept.append(item)
                keep_rows[start : start + n] = True
            else:
                error = BackendError(
                    f"model {model.name} answered NaN or infinity for this input"
                )
                self._metrics.backend_errors.labels(
                    model.name, model.kind, error.code
                ).inc()
                logger.warning(
                    "model answered non-finite probabilities",
                    extra={
                        "model": model.name,
                        "client": item.client_id,
                        "request": item.request_id,
                    },
                )
                item.fail(error)
            start += n
        return kept, rows[keep_rows], proba[keep_rows]

    def _observe_outputs(
        self,
        model: ModelBackend,
        served: list[BatchItem],
        rows: np.ndarray,
        proba: np.ndarray,
    ) -> None:
        """Show the detectors that read answers (coverage, margin) the raw
        probabilities of the rows just served. They can only change the
        client's NEXT queries' scores: policy decided these rows before the
        model ran, because a refused query must never reach the model."""
        detectors = [
            d for d in self._detectors[model.name].values() if d.observes_outputs
        ]
        if not detectors:
            return
        # A redelivered record's answer was observed the first time.
        fresh = np.concatenate(
            [
                np.full(len(i.rows), not _redelivered(i))
                for i in served
                if i.rows is not None
            ]
        )
        if not fresh.any():
            return
        client_ids = [
            i.client_id or ""
            for i in served
            if i.rows is not None and not _redelivered(i)
            for _ in range(len(i.rows))
        ]
        # Standing now: a client flagged by this very batch no longer teaches.
        learn = [self.policy.good_standing(c) for c in client_ids]
        x = self._scales[model.name].apply(rows[fresh])
        answers = np.asarray(proba[fresh], dtype=np.float64)
        for detector in detectors:
            detector.observe_outputs(client_ids, x, answers, learn=learn)

    def _observe_outcomes(self, items: Sequence[BatchItem]) -> None:
        """Tell the detectors that count outcomes (traffic) how each request
        of the batch ended; its next batch's scores see it."""
        per_model: dict[str, tuple[list[str], list[bool], list[bool]]] = {}
        for item in items:
            name = item.model_name
            if (
                item.client_id is None
                or name not in self._detectors
                or _redelivered(item)
            ):
                continue
            error = item.error
            errored = isinstance(error, (ValidationError, BackendError))
            rejected = (error is not None and not errored) or item.action in (
                "block",
                "throttle",
            )
            ids, errs, rejs = per_model.setdefault(name, ([], [], []))
            ids.append(item.client_id)
            errs.append(errored)
            rejs.append(rejected)
        # Taken before the worker produces any answer of the batch, so no
        # later than a client could read one: a closed-loop client's next
        # request then never looks sent before its last was answered.
        answered_s = time.time()
        for name, (ids, errs, rejs) in per_model.items():
            for detector in self._detectors[name].values():
                if detector.observes_outcomes:
                    detector.observe_outcomes(ids, errs, rejs, answered_s=answered_s)

    def note_groups(self, items: Sequence[BatchItem]) -> None:
        """After gateway.groups has put ``group_id``/``group_risk`` on the
        batch's items, remember them in the policy, so each client's next
        queries are judged on the larger of its and its group's risk."""
        seen: dict[str, tuple[str | None, float]] = {}
        for item in items:
            if item.client_id is None or item.verdict is None:
                continue
            before = seen.get(item.client_id, (None, 0.0))
            if item.group_risk >= before[1]:
                seen[item.client_id] = (item.group_id, item.group_risk)
        for client_id, (group_id, risk) in seen.items():
            self.policy.note_group(client_id, group_id, risk)

    def _shaped(self, item: BatchItem, proba: np.ndarray) -> np.ndarray:
        """Degrade shapes the answer, not the status: a degraded client still
        gets a valid probability tensor (gateway/shaping.py)."""
        if item.degrade is None or item.degrade == "full":
            return proba
        cfg = self.policy.resolve(
            item.model_name, item.key.plan if item.key is not None else None
        ).degrade
        shaped = shape(
            proba,
            item.degrade,  # type: ignore[arg-type]  # a DegradeLevel by config
            top_k=cfg.top_k,
            decimals=cfg.decimals,
            noise=cfg.noise,
            noise_scale=cfg.noise_scale,
            seed=seed_for(item.request_id or ""),
        )
        return shaped.astype(proba.dtype, copy=False)

    def apply_live(
        self,
        policy: PolicyConfig,
        detector_params: Mapping[str, Mapping[str, Any]],
        shadow: Mapping[str, bool],
    ) -> None:
        """Take a new live configuration between batches.

        Every detector of every model is checked before any changes, so a
        refused configuration (``ValueError`` naming the detector and field)
        leaves all of them as they were.
        """
        for detectors in self._detectors.values():
            for name, changes in detector_params.items():
                detector = detectors.get(name)
                if detector is None:
                    raise ValueError(f"detectors.{name}: not run by this worker")
                merged = {**detector.params.model_dump(), **changes}
                detector.Params.model_validate(merged)
                for key, value in changes.items():
                    if (
                        key not in detector._mutable_params
                        and getattr(detector.params, key) != value
                    ):
                        raise ValueError(
                            f"detectors.{name}.{key}: cannot change while running"
                        )
        for detectors in self._detectors.values():
            for name, changes in detector_params.items():
                detectors[name].set_params(**changes)
        # Live per-detector shadow flags join the policy's own list, so one
        # mechanism (Policy's enforced vs would-be view) handles both.
        shadowed = set(policy.shadow_detectors) | {n for n, on in shadow.items() if on}
        self.policy.reconfigure(
            policy.model_copy(update={"shadow_detectors": sorted(shadowed)})
        )

    def check_links(self, cross: CrossClientConfig) -> None:
        """Raise ``ValueError`` when live cross-client settings ask for region
        links this scorer cannot count: the region maps are fitted at start
        only when the settings file enabled them."""
        wants = cross.enabled and cross.region_enabled
        if wants and self.models and not self._region_maps:
            raise ValueError(
                "links.region_enabled: region links were off when this worker "
                "started (no region map fitted); enable them in [cross_client] "
                "and restart it"
            )

    def apply_links(self, cross: CrossClientConfig) -> None:
        """Take the live region thresholds (``check_links`` first): both are
        compared per batch, so nothing fitted changes."""
        self.check_links(cross)
        for regions in self._region_maps.values():
            regions.rare_share = cross.region_rare_share
        self._region_min_share = cross.region_min_client_share
        self._regions_on = cross.enabled and cross.region_enabled

    def _note_regions(self, model: str, client_ids: list[str], x: np.ndarray) -> None:
        """Keep the batch's counted rows for the region store: ``ood``
        outliers in a rare region, sent while at least
        ``region_min_client_share`` of their client's window are outliers.
        Without an ``ood`` detector no row counts."""
        regions = self._region_maps.get(model)
        if regions is None or not self._regions_on:
            return
        for detector in self._detectors[model].values():
            if not isinstance(detector, OutOfDistributionDetector):
                continue
            if len(detector.last_outliers) != len(x):
                return  # not this batch's bits (the detector was not called)
            outliers = np.flatnonzero(detector.last_outliers)
            if not outliers.size:
                return
            ids = regions.region_ids(x[outliers])
            rare = regions.rare(ids) & (
                detector.last_window_share[outliers] >= self._region_min_share
            )
            if rare.any():
                self._regions.append(
                    RegionBatch(
                        model=model,
                        client_ids=[client_ids[r] for r in outliers[rare].tolist()],
                        regions=ids[rare],
                    )
                )
            return

    def take_regions(self) -> list[RegionBatch]:
        """Counted rows since the last call (at most one batch per model),
        for ``gateway.groups.CrossClient``; the list is emptied."""
        taken, self._regions = self._regions, []
        return taken

    def take_fingerprints(self) -> list[FingerprintBatch]:
        """Fingerprints computed since the last call (one per model scored),
        for ``gateway.groups.CrossClient``; the list is emptied."""
        taken, self._fingerprints = self._fingerprints, []
        return taken

    # -- per-client state ---------------------------------------------------------

    def dump(self, client_id: str) -> bytes:
        """Everything this worker knows about one client, as bytes."""
        state: dict[str, dict[str, bytes]] = {}
        for model_name, detectors in self._detectors.items():
            for name, detector in detectors.items():
                blob = detector.dump_state(client_id)
                if blob is not None:
                    state.setdefault(model_name, {})[name] = blob
        policy_blob = self.policy.dump_state(client_id)
        if policy_blob is not None:
            state[_POLICY_KEY] = {"state": policy_blob}
        return msgspec.msgpack.encode(state)

    def restore(self, client_id: str, blob: bytes) -> None:
        """Load what ``dump`` produced, possibly on another worker or release.

        Part by part: a detector's state that is refused (corrupt, or from a
        layout this release neither reads nor migrates) resets that detector
        for this client only, and a refused policy state resets only the
        policy; every other part loads. Each refusal is one WARNING naming
        the client and the part, counted in
        ``modelgate_state_parts_refused_total{detector}``. The policy's part
        carries the client's enforcement (a block's cool-down, a throttle,
        flags, fused risk), so losing a detector's history never unblocks a
        client or steps it down the ladder; it only makes that detector
        start warming up again. A refused policy part does not lift a block
        either: a visible one is refused by admission on its Redis key, and
        one served hidden is put back from its hidden record before scoring
        (``gateway.enforce.restore_hidden``). Parts of a model or detector this worker
        does not run are ignored. A snapshot whose envelope cannot be read
        at all (part ``snapshot``) starts the whole client afresh.
        """
        try:
            state = msgspec.msgpack.decode(blob, type=dict[str, dict[str, bytes]])
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._part_refused(client_id, "snapshot", None)
            self.forget(client_id)
            return
        for model_name, blobs in state.items():
            if model_name == _POLICY_KEY:
                self._restore_policy(client_id, blobs)
                continue
            detectors = self._detectors.get(model_name, {})
            for name, detector_blob in blobs.items():
                detector = detectors.get(name)
                if detector is None:
                    continue
                try:
                    migrated = detector.load_state(client_id, detector_blob)
                except ValueError:
                    detector.forget(client_id)
                    self._part_refused(client_id, name, model_name)
                    continue
                if migrated:
                    self._metrics.state_parts_migrated.labels(name).inc()
                    logger.debug(
                        "client state migrated from an older layout",
                        extra={"client": client_id, "detector": name},
                    )

    def _restore_policy(self, client_id: str, blobs: Mapping[str, bytes]) -> None:
        try:
            self.policy.load_state(client_id, blobs["state"])
        # ValueError: unreadable, or values out of range (Policy.load_state).
        except (ValueError, KeyError):
            self.policy.forget(client_id)
            self._part_refused(client_id, "policy", None)

    def _part_refused(self, client_id: str, part: str, model: str | None) -> None:
        """Count and log one refused part of a client's snapshot (the
        exception being handled says why)."""
        self._metrics.state_parts_refused.labels(part).inc()
        logger.warning(
            "client state part refused; %s starts afresh for this client",
            part,
            extra={"client": client_id, "detector": part, "model": model},
            exc_info=True,
        )

    def forget(self, client_id: str) -> None:
        for detectors in self._detectors.values():
            for detector in detectors.values():
                detector.forget(client_id)
        self.policy.forget(client_id)

    def detectors_of(self, model_name: str) -> Mapping[str, Detector[Any]]:
        """The detectors of one served model, by name (for saving and loading
        their live baselines, gateway/baselines.py). Not thread-safe: call it
        and the detectors' methods only while no batch is being scored."""
        return self._detectors[model_name]


# Calibrations already computed in this process, by (overrides, reference
# bytes): every worker of a test run, and a worker restarting its scorer,
# would otherwise redo the same second of simulation per model.
_CALIBRATIONS: dict[tuple[str, bytes], Calibration] = {}
_MAX_CACHED = 32


def fit_to_features(
    overrides: Mapping[str, Mapping[str, Any]], n_features: int, model: str
) -> dict[str, dict[str, Any]]:
    """Detector overrides for a model of ``n_features`` features.

    ``fingerprint`` hashes windows of ``width`` consecutive features (6 by
    default) and refuses rows with fewer; a model with fewer features (a
    small tabular one) gets windows as wide as its rows instead of a worker
    that fails at start. Logged once per model when it applies.
    """
    fitted = {name: dict(values) for name, values in overrides.items()}
    fingerprint = fitted.setdefault("fingerprint", {})
    width = int(fingerprint.get("width", FingerprintParams().width))
    if width > n_features:
        logger.warning(
            "fingerprint windows narrowed to the model's features",
            extra={
                "model": model,
                "detector": "fingerprint",
                "width": width,
                "n_features": n_features,
            },
        )
        fingerprint["width"] = n_features
    elif not fingerprint:
        del fitted["fingerprint"]
    return fitted


def _calibrated(
    overrides: Mapping[str, Mapping[str, Any]], reference: np.ndarray
) -> Calibration:
    key = (
        json.dumps(overrides, sort_keys=True, default=str),
        hashlib.sha256(np.ascontiguousarray(reference).tobytes()).digest()
        + str(reference.shape).encode(),
    )
    found = _CALIBRATIONS.get(key)
    if found is None:
        found = calibrate(lambda o: build_detectors(o, seed=0), overrides, reference)
        if len(_CALIBRATIONS) >= _MAX_CACHED:
            _CALIBRATIONS.pop(next(iter(_CALIBRATIONS)))
        _CALIBRATIONS[key] = found
    return found


def _apply_verdict(item: BatchItem) -> None:
    """What the client gets from the item's verdict: its action, the shaping
    and delay of its answer, or the refusal of a block."""
    verdict = item.verdict
    if verdict is None:
        return
    item.action = verdict.enforced
    item.degrade = verdict.degrade
    item.delay_s = verdict.delay_s
    item.hidden = verdict.hidden
    if verdict.enforced == "block":
        item.fail(
            PolicyError("client is blocked", code="BLOCKED", retriable=True),
            action="block",
        )


def _observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe`` of every value, with one bucket count per batch.

    prometheus_client offers no bulk observe, and one call per row and
    detector cost more than the scoring it measures; this adds the same sum
    and bucket counts through the histogram's own value objects. A client
    library whose histogram lacks them gets one ``observe`` per value.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    is_parent = getattr(histogram, "_is_parent", None)
    if (
        bounds is None
        or buckets is None
        or total is None
        or is_parent is None
        or is_parent()
        or len(bounds) != len(buckets)
    ):
        for value in values.tolist():
            histogram.observe(value)
        return
    if not len(values):
        return
    # observe() counts a value in the first bucket whose bound is >= it.
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, "left")
    total.inc(float(values.sum()))
    for bucket, count in zip(*np.unique(index, return_counts=True), strict=True):
        if bucket < len(buckets):
            buckets[int(bucket)].inc(int(count))


def _redelivered(item: BatchItem) -> bool:
    return item.admission is not None and item.admission.outcome == "redelivery"


def _learn_outputs(
    detectors: Mapping[str, Detector[Any]],
    model: ModelBackend,
    reference: np.ndarray,
) -> None:
    """Seed the answer-reading detectors with the model's answers to its own
    reference sample (what honest answers look like until honest traffic
    teaches them). A model that cannot answer now only leaves them cold."""
    try:
        proba = np.asarray(model.predict_proba(model.reference), dtype=np.float64)
    except BackendError:
        logger.warning(
            "no reference answers for the answer-reading detectors",
            extra={"model": model.name},
            exc_info=True,
        )
        return
    for detector in detectors.values():
        detector.learn_output_baseline(reference, proba)
