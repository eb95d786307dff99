"""Detection and false-rejection rates of the poisoning guard on the zoo.

Offline: it drives :class:`detectors.poisoning.PoisoningGuard` directly with
the zoo's models and data (no Kafka, no Redis), because what is measured is
the screening itself; the service around it (``gateway.feedback``) adds
authentication and validation, not judgement.

Per model and seed: the held-out half of the zoo's split (the model never
trained on it) is split again, stratified, into the *calibration* half the
guard ships with (``gateway.feedback.calibration_rows``, seed 1) and the
*measurement* half. The measurement half is shuffled and shared out: 60% to
three honest submitters, 40% to one attacker, interleaved in arrival order.
The attacker poisons some of its records:

- ``flip10`` / ``flip30``: 10% / 30% of its records get a random wrong label;
- ``targeted``: every record of one class (digits: 7, binary: 1) is
  labelled as another (digits: 1, binary: 0);
- ``patch``: 30% of its records get a BadNets trigger and the label 0. On
  digits, the bottom-right 2x2 pixels (54, 55, 62, 63) at 16; on tabular
  models, the first three features at the reference's maximum plus half its
  span (clipped to the declared range, so validation accepts them).

Detection rate: share of poisoned records rejected. False rejection: share of
the other records (honest submitters' and the attacker's untouched ones)
rejected.

Restarts: with ``--restart-every N`` the guard is replaced by a freshly
calibrated one every N records, as a restarted guard process is: the
submitters' state is carried over (it is in Redis), and so are the class
windows (shared in Redis, ``gateway.feedback_windows``) unless
``--forget-windows`` asks for the guard before they were shared, whose new
process started from the calibration rows alone.

Run: ``.venv/bin/python -m evaluation.poisoning_measure [--seeds 5]
[--restart-every N [--forget-windows]]``.
Imports numpy, scikit-learn and the zoo; writes nothing but stdout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.poisoning import PoisoningGuard, PoisoningParams
from gateway.feedback_data import calibration_rows
from gateway.models import load_model
from gateway.zoo import ensure_model

MODELS = ("digits", "digits_lr", "breast_cancer", "phishing")
ATTACKS = ("none", "flip10", "flip30", "targeted", "patch")
HONEST_SHARE = 0.6
HONEST_SUBMITTERS = 3
DIGITS_PATCH = np.array([54, 55, 62, 63])


@dataclass
class Tally:
    """Counts over seeds for one (model, attack)."""

    poisoned: int = 0
    caught: int = 0
    clean: int = 0
    clean_rejected: int = 0
    records: int = 0
    seconds: float = 0.0
    by_code: dict[str, int] | None = None

    def add_code(self, code: str) -> None:
        self.by_code = self.by_code or {}
        self.by_code[code] = self.by_code.get(code, 0) + 1


def _poison(
    attack: str,
    model_name: str,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.int64],
    reference: npt.NDArray[Any],
    declared_max: float | None,
    n_classes: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """The attacker's records after poisoning, and which were poisoned."""
    x, y = x.copy(), y.copy()
    poisoned = np.zeros(len(x), dtype=bool)
    if attack in ("flip10", "flip30"):
        poisoned = rng.random(len(x)) < (0.1 if attack == "flip10" else 0.3)
        y[poisoned] = (y[poisoned] + rng.integers(1, n_classes, poisoned.sum())) % (
            n_classes
        )
    elif attack == "targeted":
        source, target = (7, 1) if n_classes == 10 else (1, 0)
        poisoned = y == source
        y[poisoned] = target
    elif attack == "patch":
        poisoned = rng.random(len(x)) < 0.3
        if model_name.startswith("digits"):
            x[np.ix_(poisoned, DIGITS_PATCH)] = 16.0
        else:
            low, high = reference.min(axis=0)[:3], reference.max(axis=0)[:3]
            value = high + 0.5 * (high - low)
            if declared_max is not None:
                value = np.minimum(value, declared_max)
            x[np.ix_(poisoned, np.arange(3))] = value
        y[poisoned] = 0
    return x, y, poisoned


def _restarted(
    guard: PoisoningGuard,
    fit: Callable[[], PoisoningGuard],
    keep_windows: bool,
) -> PoisoningGuard:
    """A new guard process: calibrated afresh, the submitters' state read back
    from where the old one saved it, and the class windows too if shared."""
    new = fit()
    for submitter in guard.submitters():
        blob = guard.dump_state(submitter)
        if blob is not None:
            new.load_state(submitter, blob)
    if keep_windows:
        for label in range(guard.n_classes):
            new.set_window(label, *guard.window(label))
    return new


def measure(
    model_name: str,
    attack: str,
    seeds: int,
    directory: Path,
    params: PoisoningParams,
    restart_every: int = 0,
    keep_windows: bool = True,
) -> Tally:
    """Run ``attack`` against ``model_name`` over ``seeds`` seeds, restarting
    the guard every ``restart_every`` records (0: never)."""
    from sklearn.model_selection import train_test_split

    ensure_model(directory, model_name)
    model = load_model(directory, model_name)
    calib, held = calibration_rows(model_name)
    x_cal, y_cal = calib
    x_all, y_all = held
    reference = np.asarray(model.reference, dtype=np.float64)
    proba_cal = model.predict_proba(x_cal)
    n_classes = proba_cal.shape[1]
    tally = Tally()
    for seed in range(seeds):
        rng = np.random.default_rng(seed)

        def fit() -> PoisoningGuard:
            return PoisoningGuard.fit(params, reference, x_cal, y_cal, proba_cal)

        guard = fit()
        x_h, x_a, y_h, y_a = train_test_split(
            x_all, y_all, train_size=HONEST_SHARE, random_state=seed, stratify=y_all
        )
        x_a, y_a, poisoned_a = _poison(
            attack,
            model_name,
            x_a,
            y_a,
            reference,
            model.signature.inputs[0].max,
            n_classes,
            rng,
        )
        # Arrival order: every record in a random order, the attacker's
        # interleaved with the honest ones.
        x = np.concatenate([x_h, x_a]).astype(np.float32)
        y = np.concatenate([y_h, y_a])
        who = [f"honest-{i % HONEST_SUBMITTERS}" for i in range(len(x_h))]
        who += ["attacker"] * len(x_a)
        poisoned = np.concatenate([np.zeros(len(x_h), dtype=bool), poisoned_a])
        order = rng.permutation(len(x))
        proba = model.predict_proba(x)
        seconds = 0.0
        for n, i in enumerate(order):
            if restart_every and n and n % restart_every == 0:
                guard = _restarted(guard, fit, keep_windows)
            start = time.perf_counter()
            verdict = guard.screen(who[i], x[i], int(y[i]), proba[i], f"r{i}")
            seconds += time.perf_counter() - start
            rejected = not verdict.accepted
            if poisoned[i]:
                tally.poisoned += 1
                tally.caught += rejected
            else:
                tally.clean += 1
                tally.clean_rejected += rejected
            if rejected and verdict.code is not None:
                tally.add_code(verdict.code)
        tally.seconds += seconds
        tally.records += len(x)
    return tally


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    parser.add_argument(
        "--restart-every",
        type=int,
        default=0,
        help="replace the guard by a new process every N records (0: never)",
    )
    parser.add_argument(
        "--forget-windows",
        action="store_true",
        help="a restarted guard starts its class windows empty (as before they "
        "were shared in Redis)",
    )
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    # Small matrix products: a threaded BLAS costs more than it gives here.
    threadpool_limits(1)
    params = PoisoningParams()
    print(
        "| model | attack | poisoned | detected | clean | false rejections "
        "| codes | µs/record |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for attack in args.attacks:
                t = measure(
                    name,
                    attack,
                    args.seeds,
                    Path(tmp),
                    params,
                    args.restart_every,
                    not args.forget_windows,
                )
                detected = f"{t.caught / t.poisoned:.1%}" if t.poisoned else "-"
                codes = ", ".join(
                    f"{c} {n}" for c, n in sorted((t.by_code or {}).items())
                )
                print(
                    f"| {name} | {attack} | {t.poisoned} | {detected} | {t.clean} "
                    f"| {t.clean_rejected / t.clean:.2%} | {codes} "
                    f"| {1e6 * t.seconds / t.records:.0f} |"
                )


if __name__ == "__main__":
    main()
