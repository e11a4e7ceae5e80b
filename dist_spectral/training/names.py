"""The names a run config refers to, checked before anything starts.

A misspelled recipe, preset, layout, DeepSpeed config or data path would otherwise surface only
where it is first used: after the process group, the data and the model exist (10–50 s of
start-up), as a traceback on every rank. :func:`check_names` reads files only (the recipe and
preset YAML, the DeepSpeed JSON) and raises :class:`~.config.ConfigError` with one line naming the
key, the bad value and the known values, with the closest one as a suggestion. (Parallel layouts
and ``data.source`` are checked as the config loads: :mod:`.config`.)
"""
from __future__ import annotations

import difflib
from pathlib import Path

from .config import ConfigError, RunConfig


def unknown_name(key: str, value, known, what: str, also: str = "") -> ConfigError:
    """One line for an unknown name: the key, the value, the closest known name and all of them."""
    known = list(known)
    close = difflib.get_close_matches(str(value), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}={value!r} is not a known {what}{hint}; known: {', '.join(known) or 'none'}"
                       + (f" {also}" if also else ""))


def _is_path(value: str) -> bool:
    """A YAML/JSON path rather than a name (the loaders treat any suffix as a path)."""
    return bool(Path(value).suffix)


def check_recipe(recipe: str, overrides: dict) -> None:
    """``optim.recipe`` names a recipe (or a readable YAML path) and ``optim.overrides`` its groups
    or its rules' hyperparameters."""
    from ..recipes import apply_overrides, list_recipes, load_recipe

    if not _is_path(recipe) and recipe not in list_recipes():
        raise unknown_name("optim.recipe", recipe, list_recipes(), "recipe", "or a YAML path")
    try:
        loaded = load_recipe(recipe)
    except (ValueError, OSError) as e:
        raise ConfigError(f"optim.recipe={recipe!r}: {e}") from None
    try:
        apply_overrides(loaded, overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"optim.overrides: {e}") from None


def check_preset(preset: str) -> None:
    """``model.preset`` names a preset (or a readable YAML path)."""
    from ..models import list_presets, load_preset

    if not _is_path(preset) and not Path(preset).is_file() and preset not in list_presets():
        raise unknown_name("model.preset", preset, list_presets(), "model preset", "or a YAML path")
    try:
        load_preset(preset)
    except (ValueError, OSError) as e:
        raise ConfigError(f"model.preset={preset!r}: {e}") from None


def check_deepspeed(cfg: RunConfig) -> None:
    """``parallel.deepspeed.config`` (engine ``deepspeed``) names a DeepSpeed JSON (or a readable path)."""
    from ..recipes import configs_dir
    from .launchers import deepspeed_json

    name = cfg.parallel.deepspeed.config
    if cfg.parallel.engine != "deepspeed" or not name:
        return
    if not name.endswith(".json"):
        known = sorted(p.stem for p in (configs_dir() / "deepspeed").glob("*.json"))
        if name not in known:
            raise unknown_name("parallel.deepspeed.config", name, known, "DeepSpeed config", "or a .json path")
    try:
        deepspeed_json(name)
    except ValueError as e:  # ConfigError, and a file that is not JSON
        raise ConfigError(f"parallel.deepspeed.config={name!r}: {e}") from None


def check_data(cfg: RunConfig) -> None:
    """``data.path`` / ``data.val_path`` exist and ``data.tokenizer`` fits the source (nothing is read)."""
    d = cfg.data
    if d.source == "builtin":
        if d.tokenizer != "bytes":
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: the built-in corpus is byte-tokenised; leave "
                              "data.tokenizer=bytes or set data.source to memmap, text or datasets")
        return
    if not d.path:
        raise ConfigError(f"data.source={d.source} needs data.path (a file or directory of the data)")
    for key, value in (("data.path", d.path), ("data.val_path", d.val_path)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist (data.source={d.source})")
    if d.source == "memmap" and Path(d.path).is_dir() and not (Path(d.path) / "train.bin").is_file():
        raise ConfigError(f"data.path={d.path!r} is a directory without train.bin (data.source=memmap wants a .bin "
                          "file of token ids or a directory with train.bin)")
    if d.source != "memmap" and d.tokenizer != "bytes" and not Path(d.tokenizer).is_dir():
        raise ConfigError(f"data.tokenizer={d.tokenizer!r} is not a local directory: give 'bytes' or the directory "
                          "of a saved tokenizer")


def check_names(cfg: RunConfig) -> None:
    """Check every name and path ``cfg`` refers to (files only: no process group, model or data).

    Raises:
        ConfigError: one line naming the key, its value and what to use instead.
    """
    check_recipe(cfg.optim.recipe, cfg.optim.overrides)
    check_preset(cfg.model.preset)
    check_deepspeed(cfg)
    check_data(cfg)


__all__ = ["check_names", "unknown_name", "check_recipe", "check_preset", "check_deepspeed", "check_data"]
