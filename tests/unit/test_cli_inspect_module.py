"""``dist-spectral inspect --module package.module:factory``: a user's own model, classified and
printed as for presets, and a clear error for each way the spec can be wrong."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from dist_spectral.cli import main  # noqa: E402

FACTORIES = "tests.unit.inspect_factories"


def _rows(out: str) -> dict[str, list[str]]:
    """Table rows by parameter name: shape, role, group, rule, lr, wd."""
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("gpt_neox.")}


def test_module_factory_is_classified_and_printed(capsys):
    assert main(["inspect", "--module", f"{FACTORIES}:tiny_neox", "--recipe", "muon"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["gpt_neox.layers.0.attention.query_key_value.weight"][:4] == ["(96,", "32)", "attention.qkv", "attention"]
    assert rows["gpt_neox.layers.0.attention.dense.weight"][2:4] == ["attention.o", "attention"]
    assert not any(name.startswith("gpt_neox.layers.1.") for name in rows)


def test_module_args_are_keyword_arguments(capsys):
    assert main(["inspect", "--module", f"{FACTORIES}:tiny_neox", "--module-arg", "layers=2", "heads=2"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in rows


@pytest.mark.parametrize("argv,message", [
    (["--module", "tests.unit.no_such_module:f"], r"--module 'tests.unit.no_such_module:f': cannot import "
                                                   r"'tests.unit.no_such_module': ModuleNotFoundError"),
    (["--module", f"{FACTORIES}"], r"write package.module:factory"),
    (["--module", f"{FACTORIES}:missing"], r"module 'tests.unit.inspect_factories' has no attribute 'missing'"),
    (["--module", f"{FACTORIES}:NOT_CALLABLE"], r"'NOT_CALLABLE' is not callable \(int\)"),
    (["--module", f"{FACTORIES}:not_a_model"], r"not_a_model\(\) returned a dict, not a torch.nn.Module"),
    (["--module", f"{FACTORIES}:tiny_neox", "--module-arg", "layers"], r"--module-arg 'layers': write key=value"),
    (["--module-arg", "layers=2"], r"--module-arg needs --module"),
])
def test_bad_module_spec_is_a_clear_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["inspect", *argv])
