"""The suite refuses to run with test dependencies missing instead of skipping their tests."""
import pytest

from tests import conftest


def test_a_missing_test_dependency_stops_the_run_naming_it(monkeypatch):
    monkeypatch.setattr(conftest, "TEST_DEPENDENCIES", ("transformers", "no_such_test_dependency"))
    monkeypatch.delenv(conftest.ALLOW_MISSING, raising=False)
    with pytest.raises(pytest.UsageError, match=r"not installed: no_such_test_dependency\. .*README command 1"):
        conftest.pytest_configure(None)


def test_the_run_may_opt_into_skips(monkeypatch):
    monkeypatch.setattr(conftest, "TEST_DEPENDENCIES", ("no_such_test_dependency",))
    monkeypatch.setenv(conftest.ALLOW_MISSING, "1")
    conftest.pytest_configure(None)  # no error: the tests that need it skip themselves


def test_everything_the_suite_needs_is_installed_here():
    assert conftest.missing_test_dependencies() == []
