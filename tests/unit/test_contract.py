"""The torch.optim contract on one process, and the errors a user meets first: each call either
works or raises at once, naming the argument, with nothing changed.

Distributed halves (an optimizer built before ``fully_shard``, ``process_group="local"``, plain
``deepspeed.initialize``): tests/distributed/test_contract.py and test_contract_deepspeed.py.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist_spectral
from dist_spectral import SpectralOptimizer, build_optimizer
from dist_spectral.recipes import load_recipe
from tests.tiny import synthetic_grad, tiny_qwen3


def set_grads(model, step: int) -> None:
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = synthetic_grad(n, tuple(p.shape), step)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----- hyperparameters -----
@pytest.mark.parametrize("overrides,message", [
    (dict(mlp={"lr": -0.01}), "group 'mlp' (rule 'muon'): lr=-0.01: must be ≥ 0"),
    (dict(lr_scale=-1), "override lr_scale=-1: it multiplies every lr of recipe 'symmetric'; give a number >= 0"),
    (dict(lr_scale="x"), "override lr_scale='x'"),
    (dict(vector={"weight_decay": -0.1}), "group 'vector' (rule 'adamw'): weight_decay=-0.1: must be ≥ 0"),
    (dict(vector={"betas": [0.9, 1.0]}), "group 'vector' (rule 'adamw'): betas[1]=1.0: must be in [0, 1)"),
    (dict(vector={"eps": 0.0}), "group 'vector' (rule 'adamw'): eps=0.0: must be > 0"),
    (dict(mlp={"beta": 1.5}), "group 'mlp' (rule 'muon'): beta=1.5: must be in [0, 1)"),
    (dict(steps=-1), "steps=-1: must be an integer ≥ 0"),
    (dict(steps=2.5), "steps=2.5: must be an integer ≥ 0"),
    (dict(mlp={"nesterov": "yes"}), "nesterov='yes': must be true or false"),
])
def test_recipe_hyperparameters_are_validated(overrides, message):
    with pytest.raises(ValueError, match="recipe 'symmetric'") as err:
        build_optimizer(tiny_qwen3(), "symmetric", **overrides)
    assert message in str(err.value)


def test_constructor_validates_hyperparameters_naming_group_key_value():
    model = tiny_qwen3()
    infos = {i.name: i for i in dist_spectral.classify(model)}
    groups = [{"params": list(model.named_parameters()), "name": "all", "rule": "adamw", "lr": -1.0,
               "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}]
    with pytest.raises(ValueError, match=r"param group 'all' \(rule 'adamw'.*\): lr=-1.0: must be ≥ 0"):
        SpectralOptimizer(groups, infos)


# ----- add_param_group -----
def frozen_layer_model():
    model = tiny_qwen3(seed=1)
    late = [(n, p) for n, p in model.named_parameters() if n.startswith("model.layers.1.")]
    for _, p in late:
        p.requires_grad_(False)
    return model, late


def test_add_param_group_steps_like_a_group_given_at_construction():
    model, late = frozen_layer_model()
    opt = build_optimizer(model, "symmetric")
    for _, p in late:
        p.requires_grad_(True)
    opt.add_param_group({"params": [(n, p) for n, p in late if p.ndim == 2], "name": "late", "rule": "muon",
                         "lr": 0.02})
    assert opt.param_groups[-1]["beta"] == 0.95  # the rule's defaults fill what the group omits
    opt.add_param_group({"params": [(n, p) for n, p in late if p.ndim < 2], "rule": "adamw", "lr": 1e-3})

    twin, twin_late = frozen_layer_model()
    for _, p in twin_late:
        p.requires_grad_(True)
    groups = [dict(g, params=list(zip(g["param_names"], (twin.get_parameter(n) for n in g["param_names"]))))
              for g in opt.param_groups]
    for g in groups:
        del g["param_names"]
    want = SpectralOptimizer(groups, opt.infos)
    for step in range(2):
        set_grads(model, step)
        set_grads(twin, step)
        opt.step()
        want.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, twin.get_parameter(n)), n
    assert not torch.equal(late[0][1], tiny_qwen3(seed=1).get_parameter(late[0][0]))


@pytest.mark.parametrize("group,error,message", [
    ({"params": "tensors", "rule": "muon"}, TypeError, "give 'params' as (name, parameter) pairs"),
    ({"params": "pairs"}, ValueError, "the group names no 'rule'"),
    ({"params": "pairs", "rule": "muon", "momentum": 0.9}, ValueError, "key(s) ['momentum'] are not hyperparameters"),
    ({"params": "pairs", "rule": "muon", "lr": -0.1}, ValueError, "lr=-0.1: must be ≥ 0"),
    ({"params": "renamed", "rule": "muon"}, ValueError, "parameter 'nope.weight' is not a parameter of the model"),
    ({"params": "held", "rule": "adamw"}, ValueError, "is already in a param group of this optimizer"),
])
def test_add_param_group_refuses_bad_groups_and_changes_nothing(group, error, message):
    model, late = frozen_layer_model()
    opt = build_optimizer(model, "symmetric")
    matrices = [(n, p) for n, p in late if p.ndim == 2]
    params = {"tensors": [p for _, p in matrices], "pairs": matrices,
              "renamed": [("nope.weight", matrices[0][1])],
              "held": [("model.embed_tokens.weight", model.model.embed_tokens.weight)]}[group["params"]]
    groups_before, states_before = len(opt.param_groups), len(opt.state)
    with pytest.raises(error) as err:
        opt.add_param_group({**group, "params": params})
    assert message in str(err.value)
    assert len(opt.param_groups) == groups_before and len(opt.state) == states_before


# ----- what build_optimizer takes -----
def test_build_optimizer_on_parameters_says_to_pass_the_model():
    with pytest.raises(TypeError, match=r"model: got generator, not an nn.Module; pass the model itself"):
        build_optimizer(tiny_qwen3().parameters())


def test_unknown_recipe_key_is_rejected_naming_key_recipe_and_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"recipe 'mine' has unknown key\(s\) \['lr'\]; a recipe's keys are "
                                         r"name, description, base, groups"):
        load_recipe({"name": "mine", "base": "symmetric", "lr": 0.1})
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nbase: muon\ngroup:\n  - {name: mlp, lr: 0.01}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['group'\]"):
        build_optimizer(tiny_qwen3(), path)


def test_fallback_group_is_reported_once_at_build():
    recipe = {"name": "partial", "groups": [{"name": "vector", "match": {"role": "vector"}, "rule": "adamw",
                                             "lr": 1e-3}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_optimizer(tiny_qwen3(), recipe)
    said = [str(w.message) for w in caught if "fallback" in str(w.message)]
    assert len(said) == 1
    assert "matched no group of recipe 'partial' and fell to the 'fallback' group (rule adamw" in said[0]
    assert "lm_head.weight (97, 32) (role lm_head)" in said[0]


# ----- parameters replaced after the optimizer was built -----
def test_replaced_parameter_raises_at_first_step_and_nothing_moves():
    model = tiny_qwen3()
    opt = build_optimizer(model, "symmetric")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # what fully_shard does to all
    set_grads(model, 0)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"lm_head.weight is no longer the model's parameter.*Build the optimizer "
                                           r"after fully_shard"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.num_steps == 0


def test_replaced_parameters_without_any_gradient_raise():
    model = tiny_qwen3()
    opt = build_optimizer(model, "adamw")
    opt.step()  # no gradient anywhere, parameters still the model's: a no-op, as in torch
    for name, p in list(model.named_parameters()):
        module, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(module, attr, nn.Parameter(p.detach().clone()))
    set_grads(model, 0)  # the new parameters have gradients, the optimizer's have none
    with pytest.raises(RuntimeError, match=r"\(and \d+ more\) is no longer the model's parameter"):
        opt.step()


def test_flat_tensors_swapped_in_name_dist_spectral_deepspeed_initialize():
    """What plain ``deepspeed.initialize`` with ZeRO does to a client optimizer's groups."""
    model = tiny_qwen3()
    opt = build_optimizer(model, "adamw")
    for g in opt.param_groups:
        flat = torch.zeros(sum(p.numel() for p in g["params"]), requires_grad=True)
        flat.grad = torch.ones_like(flat)
        g["params"] = [flat]
    with pytest.raises(RuntimeError, match=r"dist_spectral.deepspeed.initialize\(model=model, optimizer=opt"):
        opt.step()


def test_sharded_tensors_swapped_in_name_building_after_sharding(tmp_path):
    """What Accelerate's FSDP2 ``prepare`` does to an optimizer built before it: DTensor parameters
    swapped into the groups. The error says to build after sharding, not to use DeepSpeed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny_qwen3()
        opt = build_optimizer(model, "adamw")
        before = snapshot(model)
        for g in opt.param_groups:
            sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in g["params"]]
            for p in sharded:
                p.grad = torch.ones_like(p)
            g["params"] = sharded
        with pytest.raises(RuntimeError, match=r"sharded \(fully_shard, or Accelerate's prepare .*\) after the "
                                               r"optimizer was built.*after accelerator.prepare\(model\)"):
            opt.step()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    finally:
        dist.destroy_process_group()


# ----- the README's DeepSpeed snippet -----
def test_deepspeed_module_is_an_attribute_without_importing_deepspeed():
    code = ("import sys, dist_spectral; f = dist_spectral.deepspeed.initialize; "
            "assert 'deepspeed' not in sys.modules, 'importing dist_spectral imported deepspeed'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


# ----- process_group -----
def test_process_group_argument_is_checked():
    with pytest.raises(TypeError, match=r"process_group='world': give None \(the default process group\), 'local'"):
        build_optimizer(tiny_qwen3(), "adamw", process_group="world")


def test_local_process_group_steps_like_the_default():
    a, b = tiny_qwen3(), tiny_qwen3()
    opt_a = build_optimizer(a, "symmetric")
    opt_b = build_optimizer(b, "symmetric", process_group="local")
    assert opt_b.topology.world_size == 1 and opt_b.topology.group is None
    for step in range(2):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
    for n, p in a.named_parameters():
        assert torch.equal(p, b.get_parameter(n)), n


def test_state_dict_keeps_the_step_counters():
    model = tiny_qwen3()
    opt = build_optimizer(model, "symmetric")
    for step in range(3):
        set_grads(model, step)
        opt.step()
    fresh = build_optimizer(tiny_qwen3(), "symmetric")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.num_steps == 3
