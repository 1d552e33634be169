"""The independent readers the tests check fp8norm's outputs with (transformers, compressed-tensors, ...).

Under CI=true a reader that cannot be imported fails the test: a green CI run means the real readers
ran (a broken install once turned 16 reader tests into silent skips). Elsewhere it skips, so a
developer without the `test` extra can still run the rest."""

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def reader(module: str):
    """`module`, imported; a skip outside CI, a failure (with the ImportError) in CI."""
    if in_ci():
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"CI=true: the reader {module!r} must be importable (pip install -e '.[test]'): {e}")
    return pytest.importorskip(module)
