"""fp8norm.plan: the fingerprint covers what decides the output bytes (and only that), once per plan."""

import shutil

import pytest

from fp8norm.examples import make_example
from fp8norm.plan import Plan
from fp8norm.quantize import plan


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("plan") / "src", "llama", "single")


def test_the_fingerprint_changes_with_every_setting_that_changes_the_bytes(src):
    base = plan(src).fingerprint()
    assert plan(src).fingerprint() == base  # the same plan again: the same fingerprint
    changed = {
        "scale_fmt": plan(src, scale_fmt="ue8m0"), "scale_dtype": plan(src, scale_dtype="bfloat16"),
        "exclude": plan(src, exclude=["mlp"]), "calib": plan(src, calib="rms"),
        "max_shard_size": plan(src, max_shard_size="100KB"), "scheme": plan(src, scheme="mxfp8"),
    }
    prints = {k: p.fingerprint() for k, p in changed.items()}
    assert base not in prints.values() and len(set(prints.values())) == len(prints), prints


def test_a_moved_source_keeps_its_fingerprint(src, tmp_path):
    moved = shutil.copytree(src, tmp_path / "elsewhere")
    assert plan(moved).fingerprint() == plan(src).fingerprint()


def test_the_fingerprint_is_computed_once(src, monkeypatch):
    p = plan(src)
    calls = []
    real = Plan.to_dict
    monkeypatch.setattr(Plan, "to_dict", lambda self: (calls.append(1), real(self))[1])
    first = p.fingerprint()
    assert p.fingerprint() == first and len(calls) == 1
    assert plan(src).fingerprint() == first and len(calls) == 2  # per plan, not per process
