"""Run configs: composition of the YAML files, key.sub=value overrides and their errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from dist_spectral.recipes import configs_dir
from dist_spectral.training import DEFAULT_RUN, parse_args, without_local_rank
from dist_spectral.training import config as config_module
from dist_spectral.training.config import (ConfigError, RunConfig, builtin_runs_dir, dump, load_config, parse_override,
                                           run_names, runs_dir)

RUNS = run_names()
LAYOUTS = sorted(p.stem for p in (configs_dir() / "parallel").glob("*.yaml"))


def test_default_run_is_the_readme_job():
    cfg = load_config(DEFAULT_RUN)
    assert (cfg.model.preset, cfg.optim.recipe, cfg.parallel.engine, cfg.data.source) == \
        ("tiny-olmoe", "symmetric", "fsdp", "builtin")
    assert cfg.output == Path("runs") / "tiny-olmoe-fsdp"


def test_default_run_ships_in_the_package(tmp_path, monkeypatch):
    # A wheel install has no repository configs/runs: the default resolves to the package's copy.
    monkeypatch.setattr(config_module, "runs_dir", lambda: tmp_path)
    assert not (runs_dir() / f"{DEFAULT_RUN}.yaml").exists()
    cfg = load_config(parse_args([]).config)
    assert (cfg.name, cfg.model.preset, cfg.parallel.engine) == (DEFAULT_RUN, "tiny-olmoe", "fsdp")
    assert (builtin_runs_dir() / f"{DEFAULT_RUN}.yaml").is_file()


def test_repository_runs_come_first_and_name_the_builtin_as_base(tmp_path, monkeypatch):
    (tmp_path / f"{DEFAULT_RUN}.yaml").write_text(f"name: {DEFAULT_RUN}\ntrain: {{steps: 3}}\n")
    (tmp_path / "child.yaml").write_text(f"name: child\nbase: {DEFAULT_RUN}\n")
    monkeypatch.setattr(config_module, "runs_dir", lambda: tmp_path)
    assert load_config(DEFAULT_RUN).train.steps == 3
    assert load_config("child").train.steps == 3  # the base next to the file, before the built-in one
    (tmp_path / f"{DEFAULT_RUN}.yaml").unlink()
    assert load_config("child").train.steps == 300  # then by name, the built-in one
    with pytest.raises(ConfigError, match=r"unknown runs config 'chlid' \(did you mean 'child'\?\)"):
        load_config("chlid")


@pytest.mark.parametrize("run", RUNS)
def test_every_run_config_loads_and_names_its_command(run):
    path = next(d / f"{run}.yaml" for d in (runs_dir(), builtin_runs_dir()) if (d / f"{run}.yaml").is_file())
    head = [line for line in path.read_text().splitlines() if line.startswith("#")]
    command = next((line for line in head if line.startswith("# Command:")), None)
    assert command is not None, f"{path} has no '# Command:' line at the top"
    assert "launch/train.py" in command or "dist-spectral train" in command
    cfg = load_config(run)
    assert cfg.name == run


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_parallel_layout_loads(layout):
    cfg = load_config(DEFAULT_RUN, [f"parallel={layout}"])
    assert cfg.parallel.engine == {"ep-hsdp": "ep"}.get(layout, layout)


def test_overrides_set_typed_values():
    cfg = load_config(DEFAULT_RUN, ["train.steps=7", "optim.clip_grad=1", "data.seq_len=32", "name=x",
                                    "optim.overrides.router.rule=centered_row_norm", "optim.overrides.steps=8",
                                    "model.config.num_hidden_layers=2", "optim.comm_dtype=bfloat16"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.data.seq_len == 32 and cfg.name == "x"
    assert cfg.optim.overrides == {"router": {"rule": "centered_row_norm"}, "steps": 8}
    assert cfg.model.config == {"num_hidden_layers": 2}
    assert cfg.optim.comm_dtype == "bfloat16"


def test_named_sections_load_their_files():
    cfg = load_config(DEFAULT_RUN, ["parallel=hsdp", "parallel.replicas=4", "model=tiny-qwen3", "optim=muon"])
    assert (cfg.parallel.engine, cfg.parallel.replicas) == ("hsdp", 4)
    assert cfg.model.preset == "tiny-qwen3" and cfg.optim.recipe == "muon"


def test_later_override_wins():
    assert load_config(DEFAULT_RUN, ["train.steps=3", "train.steps=4"]).train.steps == 4


@pytest.mark.parametrize("item, key, valid", [
    ("train.stepz=5", "train.stepz", "steps"),
    ("trian.steps=5", "trian", "train"),
    ("data.seq=5", "data.seq", "seq_len"),
    ("parallel.replica=2", "parallel.replica", "replicas"),
])
def test_unknown_key_names_it_and_lists_valid_keys(item, key, valid):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_RUN, [item])
    message = str(err.value)
    assert repr(key) in message and valid in message


@pytest.mark.parametrize("item, fragment", [
    ("train.steps=many", "train.steps: expected int"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.plot=3", "train.plot: expected bool"),
    ("train.steps.x=1", "'train.steps' is a value"),
    ("parallel.engine=zero3", "parallel.engine='zero3'"),
    ("data.source=web", "data.source='web'"),
    ("parallel=nonsense", "unknown parallel config 'nonsense'"),
    ("train.steps", "write key.sub=value"),
    ("model.preset=[1]", "model.preset: expected str"),
])
def test_bad_values_are_clear_errors(item, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_RUN, [item])
    assert fragment in str(err.value)


def test_unknown_key_in_a_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "train": {"steps": 3, "lr": 0.1}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lr'; valid keys of train: steps"):
        load_config(str(path))


def test_base_composes_and_a_named_section_replaces(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(yaml.safe_dump({"base": DEFAULT_RUN, "name": "child", "parallel": "ddp",
                                    "train": {"steps": 11}, "data": {"batch_size": 2}}))
    base, cfg = load_config(DEFAULT_RUN), load_config(str(path))
    assert cfg.name == "child" and cfg.train.steps == 11 and cfg.data.batch_size == 2
    assert cfg.data.seq_len == base.data.seq_len and cfg.train.eval_every == base.train.eval_every  # kept from base
    assert cfg.parallel.engine == "ddp"


def test_base_name_is_found_next_to_the_file_first(tmp_path):
    # The repository's run configs are not package data: a copy of configs/runs elsewhere (a wheel install, a user's
    # own folder) must resolve `base: <name>` among its neighbours, not in the repository.
    (tmp_path / DEFAULT_RUN).with_suffix(".yaml").write_text(yaml.safe_dump(
        {"name": "local-base", "parallel": "ddp", "train": {"steps": 7}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": DEFAULT_RUN, "name": "child"}))
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.name, cfg.train.steps, cfg.parallel.engine) == ("child", 7, "ddp")


def test_base_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: " + str(tmp_path / "b.yaml") + "\n")
    (tmp_path / "b.yaml").write_text("base: " + str(tmp_path / "a.yaml") + "\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(tmp_path / "a.yaml"))


def test_dump_round_trips(tmp_path):
    cfg = load_config(DEFAULT_RUN, ["train.steps=9", "optim.overrides.router.rule=centered_row_norm"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump(cfg))
    assert load_config(str(path)) == cfg


def test_parse_override_uses_yaml_values():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=x=y") == ("a", "x=y")


def test_cli_arguments_mix_options_and_overrides():
    args = parse_args(["train.steps=3", "--resume", "--config", "x.yaml", "data.seq_len=8"])
    assert args.config == "x.yaml" and args.resume == "auto"
    assert args.overrides == ["train.steps=3", "data.seq_len=8"]
    assert parse_args([]).resume is None and RunConfig().train.steps >= 1


def test_resume_without_value_before_an_override_keeps_the_override():
    args = parse_args(["name=a", "--resume", "train.steps=600", "data.seq_len=8"])
    assert args.resume == "auto"
    assert args.overrides == ["name=a", "train.steps=600", "data.seq_len=8"]
    assert parse_args(["--resume", "runs/a/checkpoints/step_000010"]).resume == "runs/a/checkpoints/step_000010"


@pytest.mark.parametrize("argv", [["--local_rank=1", "--config", "x", "a.b=1"], ["--config", "x", "--local-rank", "1", "a.b=1"]])
def test_the_deepspeed_launchers_local_rank_flag_is_dropped(argv, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert without_local_rank(argv) == ["--config", "x", "a.b=1"]
    assert os.environ["LOCAL_RANK"] == "1"
