"""Records ``ood_state_before_lattice_block.npz``: per-client ``ood`` states as
the release before ``lattice_block`` saved them (commit 4258bd5, the last of
session 9; 5172cf8 then added the ring of off-lattice bits, the only layout
change of any detector since), and the rows that made them, for
tests/detectors/test_ood_migration.py.

Run from a checkout of that commit, with this repository's venv::

    git worktree add --detach /tmp/old 4258bd5
    PYTHONPATH=/tmp/old .venv/bin/python \\
        tests/detectors/data/make_ood_state_before_lattice_block.py

Two clients, default parameters (window 50), digits scaled by 1/16 and split
as tests/detectors/conftest.py does: ``young`` sends 10 real digits then 3
Jacobian-like steps (13 queries, all in its window); ``old`` sends 30 steps,
then 40 real digits, then 4 steps (74 queries: 24 have left its window,
which still holds 10 of its 34 off-lattice queries).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from detectors import OodParams, OutOfDistributionDetector

OUT = Path(__file__).with_name("ood_state_before_lattice_block.npz")


def main() -> None:
    import detectors.ood

    if 'window_fields("off_lattice"' in Path(detectors.ood.__file__).read_text():
        sys.exit("run this from a checkout of 4258bd5 (see the docstring)")
    X, y = load_digits(return_X_y=True)
    train, test, _, _ = train_test_split(
        X / 16.0, y, test_size=0.3, stratify=y, random_state=0
    )
    detector = OutOfDistributionDetector(OodParams())
    detector.learn_baseline(np.asarray(train, dtype=np.float64))
    forest = detector._forest
    assert forest is not None and detector.query_threshold is not None
    ordinary = test[
        (forest.score(test) < 0.9 * detector.query_threshold)
        & (detector.outside_range(test) == 0)
        & (detector.off_lattice(test) == 0)
    ]
    signs = np.sign(np.random.default_rng(3).normal(size=ordinary.shape))
    stepped = np.clip(ordinary + 0.1 * signs, 0.0, 1.0)
    streams = {
        "young": np.concatenate([ordinary[:10], stepped[:3]]),
        "old": np.concatenate([stepped[10:40], ordinary[10:50], stepped[40:44]]),
    }
    blobs = {}
    for client, rows in streams.items():
        detector.score_batch([client] * len(rows), rows, learn=[False] * len(rows))
        blob = detector.dump_state(client)
        assert blob is not None
        blobs[client] = np.frombuffer(blob, dtype=np.uint8)
    np.savez_compressed(
        OUT,
        **{f"rows_{c}": r for c, r in streams.items()},
        **{f"blob_{c}": b for c, b in blobs.items()},
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
