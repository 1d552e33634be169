"""tests/readers.py: in CI a missing reader fails the test instead of skipping it."""

import pytest

from tests.readers import reader


def test_a_missing_reader_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the reader 'no_such_reader_pkg' must be importable"):
        reader("no_such_reader_pkg")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        reader("no_such_reader_pkg")


def test_a_present_reader_is_the_module(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert reader("json").dumps([1]) == "[1]"
