"""``modelgate --help`` starts without the heavy libraries.

Every command's module is imported to build the command tree, so a module-level
``import numpy`` in any of them made ``--help`` and ``keys list`` cost seconds of
CPU. Runs the CLI in a fresh interpreter, as a person would. Needs no services.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Libraries only some commands need; each costs a noticeable part of a second.
HEAVY = ("numpy", "river", "sklearn", "aiokafka", "fastapi", "httpx", "redis")

_PROBE = """
import runpy, sys, json
sys.argv = ["modelgate", *ARGS]
try:
    runpy.run_module("gateway", run_name="__main__")
except SystemExit:
    pass
loaded = sorted({m.split(".")[0] for m in sys.modules})
sys.stderr.write("\\nLOADED " + json.dumps(loaded))
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["keys", "--help"], ["config", "--help"]], ids=" ".join
)
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    import json

    result = subprocess.run(
        [sys.executable, "-c", _PROBE.replace("ARGS", repr(args))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Usage" in result.stdout, result.stdout + result.stderr
    loaded = set(json.loads(result.stderr.rsplit("LOADED ", 1)[1]))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
