"""Recipes: ordered selectors → rule and hyperparameters, loaded from YAML.

A recipe is a list of groups. Each group has a ``name``, a ``match`` (any of ``role``: a role or
role prefix or a list of them; ``name``: a regex searched in the parameter's name; ``module``: a
regex matched against the owning module's class name; all given selectors must hold), a ``rule``
and its hyperparameters. The first group that matches a parameter takes it. A recipe may start
from another (``base: symmetric``) and change groups by name.

Errors, all raised before any optimizer exists: an unknown rule, an unknown hyperparameter for a
rule, a ``name``/``module`` pattern that matches no parameter (role selectors may match nothing:
a dense model has no router), an override naming a group the recipe does not have. A parameter
no group takes falls to AdamW and, when it is a matrix, is reported.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .roles import ROLES, ParamInfo
from .rules import check_group, get_rule

GENERIC_KEYS = {"lr", "weight_decay", "schedule"}
#: Keys a recipe may have at its top level, and in each group besides the rule's hyperparameters.
RECIPE_KEYS = ("name", "description", "base", "groups")
GROUP_KEYS = ("name", "match", "rule")
SCHEDULES = ("matrix", "vector", "constant")


def configs_dir() -> Path:
    """The directory of the configs the library reads by name: ``recipes/``, ``models/`` (presets),
    ``parallel/`` (layouts) and ``deepspeed/``.

    They ship inside the package (``dist_spectral/configs``), so a wheel install finds them as a
    checkout does. ``$DIST_SPECTRAL_CONFIG_DIR``, when set, replaces the whole directory (see
    :mod:`dist_spectral.models`); a YAML path given instead of a name is always read as is.
    """
    from .models import CONFIG_DIR_ENV

    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "configs"


def list_recipes() -> list[str]:
    """Names of the recipes in ``configs_dir() / "recipes"`` (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in (configs_dir() / "recipes").glob("*.yaml"))


def load_recipe(recipe: str | dict | Path) -> dict:
    """A recipe as a dict with ``name`` and ``groups``, with ``base`` resolved.

    Args:
        recipe: a recipe name in ``configs/recipes``, a YAML path, or a dict of the same form.
    """
    if isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
    else:
        path = Path(recipe)
        if not path.suffix:
            path = configs_dir() / "recipes" / f"{recipe}.yaml"
        if not path.exists():
            raise ValueError(f"unknown recipe {str(recipe)!r}: no file {path}; known recipes: {', '.join(list_recipes())}")
        data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"recipe {str(recipe)!r} is a {type(data).__name__}, not a mapping with keys "
                         f"{', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"recipe {data.get('name', str(recipe))!r} has unknown key(s) {unknown}; a recipe's keys "
                         f"are {', '.join(RECIPE_KEYS)} (hyperparameters go inside a group)")
    if "base" in data:
        base = load_recipe(data.pop("base"))
        data["groups"] = merge_groups(base["groups"], data.get("groups", []), data.get("name", "recipe"))
        data.setdefault("name", base["name"])
    if not data.get("groups"):
        raise ValueError(f"recipe {data.get('name')!r} has no groups")
    return data


def merge_groups(base: list[dict], changes: list[dict], where: str) -> list[dict]:
    """Update base groups by name; a change with a ``match`` and a new name is added in front."""
    groups = copy.deepcopy(base)
    by_name = {g["name"]: g for g in groups}
    new = []
    for change in changes:
        if change.get("name") in by_name:
            target = by_name[change["name"]]
            if "rule" in change and change["rule"] != target.get("rule"):
                # A new rule starts from that rule's defaults, not the old rule's hyperparameters.
                keep = {k: target[k] for k in ("name", "match", "lr", "weight_decay", "schedule") if k in target}
                target.clear()
                target.update(keep)
            target.update(change)
        elif "match" in change:
            new.append(copy.deepcopy(change))
        else:
            raise ValueError(f"{where}: group {change.get('name')!r} is not in the recipe "
                             f"(groups: {', '.join(by_name)}) and has no 'match' to add it")
    return new + groups


@dataclass
class GroupSpec:
    """A resolved param group: its rule, hyperparameters and member parameters."""

    name: str
    rule: str
    hyper: dict
    members: list[ParamInfo] = field(default_factory=list)


def _role_matches(role: str, wanted) -> bool:
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    return any(role == w or role.startswith(w + ".") for w in wanted)


def check_roles(group: dict, where: str) -> None:
    """A ``role`` selector must name a role of :data:`~dist_spectral.roles.ROLES` or a prefix of one
    (``attention``, ``mlp``, ``expert``): a misspelt role would otherwise silently match nothing."""
    wanted = group.get("match", {}).get("role")
    if wanted is None:
        return
    known = set(ROLES) | {r.split(".")[0] for r in ROLES}
    bad = [w for w in ([wanted] if isinstance(wanted, str) else list(wanted)) if w not in known]
    if bad:
        raise ValueError(f"{where}: group {group.get('name')!r} selects unknown role(s) {bad}; roles are "
                         f"{', '.join(sorted(known))}")


def _matches(info: ParamInfo, match: dict) -> bool:
    unknown = set(match) - {"role", "name", "module"}
    if unknown:
        raise ValueError(f"unknown selector(s) {sorted(unknown)} in a recipe match; use role, name or module")
    if "role" in match and not _role_matches(info.role, match["role"]):
        return False
    if "name" in match and not re.search(match["name"], info.name):
        return False
    if "module" in match and not re.search(match["module"], info.module_type):
        return False
    return True


def resolve_hyper(group: dict, where: str) -> tuple[str, dict]:
    rule_name = group.get("rule")
    if rule_name is None:
        raise ValueError(f"{where}: group {group.get('name')!r} names no rule")
    rule = get_rule(rule_name)
    hyper = dict(rule.defaults)
    allowed = GENERIC_KEYS | set(rule.defaults)
    for k, v in group.items():
        if k in GROUP_KEYS:
            continue
        if k not in allowed:
            raise ValueError(f"{where}: group {group.get('name')!r} sets {k!r}, which rule {rule_name!r} does not take; "
                             f"it takes {', '.join(sorted(allowed))} (and a group's {', '.join(GROUP_KEYS)})")
        hyper[k] = v
    if "lr" not in hyper:
        raise ValueError(f"{where}: group {group.get('name')!r} has no lr")
    hyper.setdefault("weight_decay", 0.0)
    if hyper.get("schedule", "matrix") not in SCHEDULES:
        raise ValueError(f"{where}: group {group.get('name')!r} has schedule {hyper['schedule']!r}; use one of {SCHEDULES}")
    if "betas" in hyper:
        if not isinstance(hyper["betas"], (list, tuple)) or len(hyper["betas"]) != 2:
            raise ValueError(f"{where}: group {group.get('name')!r} (rule {rule.name!r}): betas={hyper['betas']!r}; "
                             "give two numbers [beta1, beta2], e.g. [0.9, 0.95]")
        hyper["betas"] = tuple(hyper["betas"])
    try:
        check_group({"rule": rule_name, **hyper})
    except ValueError as err:
        raise ValueError(f"{where}: group {group.get('name')!r} (rule {rule_name!r}): {err}") from None
    return rule_name, hyper


def apply_overrides(recipe: dict, overrides: dict) -> dict:
    """Overrides: ``groups=[...]`` (new groups, in front), ``<group name>={...}`` (change a group),
    ``lr_scale=x`` (multiply every lr) or ``key=value`` (set on every group whose rule takes it)."""
    recipe = copy.deepcopy(recipe)
    where = f"recipe {recipe.get('name')!r}"
    names = {g["name"] for g in recipe["groups"]}
    if "groups" in overrides:
        recipe["groups"] = merge_groups(recipe["groups"], list(overrides["groups"]), where)
        names = {g["name"] for g in recipe["groups"]}
    for key, value in overrides.items():
        if key == "groups":
            continue
        if key in names:
            if not isinstance(value, dict):
                raise ValueError(f"override {key}={value!r}: {key!r} is a group of {where}; pass a dict of fields")
            recipe["groups"] = merge_groups(recipe["groups"], [{"name": key, **value}], where)
        elif key == "lr_scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"override lr_scale={value!r}: it multiplies every lr of {where}; give a number >= 0")
            for g in recipe["groups"]:
                g["lr"] = g["lr"] * value
        else:
            hit = False
            for g in recipe["groups"]:
                if key in GENERIC_KEYS or key in get_rule(g["rule"]).defaults:
                    g[key] = value
                    hit = True
            if not hit:
                raise ValueError(f"override {key!r} is neither a group of {where} ({', '.join(sorted(names))}) nor a "
                                 "hyperparameter of any of its rules")
    return recipe


def assign(infos: list[ParamInfo], recipe: dict, fallback_lr: float | None = None) -> tuple[list[GroupSpec], list[str]]:
    """Place every parameter in the first matching group.

    Returns:
        (groups with members, in recipe order, empty ones dropped; report lines about
        parameters that fell to the AdamW fallback).
    """
    where = f"recipe {recipe.get('name')!r}"
    specs = []
    for g in recipe["groups"]:
        rule, hyper = resolve_hyper(g, where)
        check_roles(g, where)
        specs.append((g, GroupSpec(g["name"], rule, hyper)))
    fallback = None
    report = []
    for info in infos:
        for g, spec in specs:
            if _matches(info, g.get("match", {})):
                spec.members.append(info)
                break
        else:
            if fallback is None:
                lr = fallback_lr or next((s.hyper["lr"] for _, s in specs if s.rule == "adamw"), 1e-3)
                fallback = GroupSpec("fallback", "adamw", {**get_rule("adamw").defaults, "lr": lr,
                                                           "weight_decay": 0.0, "schedule": "vector"})
            fallback.members.append(info)
            if len(info.shape) >= 2:
                report.append(f"{info.name} {tuple(info.shape)} (role {info.role}) matched no group of {where}: "
                              "it gets AdamW")
    for g, spec in specs:
        patterns = {k: v for k, v in g.get("match", {}).items() if k in ("name", "module")}
        if patterns and not spec.members:
            raise ValueError(f"{where}: group {g['name']!r} pattern {patterns} matches no parameter; "
                             "check the name regex against `dist-spectral inspect`")
    groups = [s for _, s in specs if s.members] + ([fallback] if fallback else [])
    for s in groups:
        s.hyper.setdefault("schedule", "vector" if all(len(i.shape) <= 1 or i.role == "vector" for i in s.members)
                           else "matrix")
    if report:
        # Said once per build: warnings.warn shows by default (logging needs a configured handler).
        warnings.warn(f"{len(report)} parameter(s) matched no group of {where} and fell to the 'fallback' group "
                      f"(rule adamw, lr {fallback.hyper['lr']:g}): " + "; ".join(report), stacklevel=4)
    return groups, report
