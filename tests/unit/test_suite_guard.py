"""The suite refuses to run with test dependencies missing instead of skipping their tests, and its
test modules share code only through helper modules (a test module imported by another runs its
module-level fixtures and parametrisations twice and ties the two files' edits together)."""
import ast
from pathlib import Path

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


TESTS = Path(__file__).resolve().parents[1]


def imported_test_modules(source: str, package: str) -> list[str]:
    """The test modules (``test_*``) that ``source``, a module of ``package``, imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            modules = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [m for m in modules if m.startswith("tests.") and m.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_the_import_check_sees_each_form():
    # split so that grepping the suite for such imports finds none here
    assert imported_test_modules("from tests.distributed." "test_checkpoint import run_forked", "tests.distributed")
    assert imported_test_modules("import tests.unit.test_errors as e", "tests.unit")
    assert imported_test_modules("from tests.distributed import test_pipeline", "tests.unit")
    assert imported_test_modules("def f():\n    from .test_pipeline import stage_model\n", "tests.distributed")
    assert not imported_test_modules("from tests.distributed.harness import run_world\nfrom tests import conftest",
                                   "tests.unit")


def test_no_test_module_imports_another():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        package = ".".join(("tests",) + path.relative_to(TESTS).parent.parts)
        if found := imported_test_modules(path.read_text(), package):
            offenders[str(path.relative_to(TESTS.parent))] = found
    assert not offenders, (f"test modules import from other test modules: {offenders}; move what they share into "
                           "a helper module (tests/distributed/harness.py, scenarios.py, tests/tiny.py)")
