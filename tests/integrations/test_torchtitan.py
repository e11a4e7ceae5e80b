"""``DistSpectralOptimizers`` against torchtitan 0.3.0's own pieces at W = 2 (gloo, FSDP2): its Llama 3
debug model (2 of its layers), its ``OptimizersContainer`` and ``LRSchedulersContainer`` built from
their configs, and its flat, FQN-keyed optimizer state through ``torch.distributed.checkpoint``.

torchtitan's trainer itself does not run on CPU (see the README), and its language models attend
only through FlexAttention (no CPU backward) or flash varlen kernels; the model here swaps in
torchtitan's own ``ScaledDotProductAttention`` module, which changes no parameter. torchtitan is not a
test dependency (it pins an older fsspec than ours): these tests run where it is installed.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchtitan")

from tests.distributed.harness import run_world  # noqa: E402

STEPS, SAVE_AT, BATCH, LENGTH, VOCAB = 4, 2, 4, 16, 2048


def tiny_titan(seed: int = 0):
    """torchtitan's ``debugmodel`` Llama 3, its first 2 layers, attending through SDPA."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    config = model_registry("debugmodel").model
    config.layers = config.layers[:2]
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(seed)
    model = config.build()
    model.init_states()
    return model


def build(model, **overrides):
    """torchtitan's containers from their configs, as its trainer builds them."""
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer

    from dist_spectral.integrations.torchtitan import DistSpectralOptimizers

    opts = DistSpectralOptimizers.Config(recipe="symmetric", overrides=overrides).build(model_parts=[model])
    scheds = LRSchedulersContainer.Config(warmup_steps=1, decay_ratio=0.5).build(optimizers=opts, training_steps=STEPS)
    return opts, scheds


def tokens(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(step))


def train_step(model, opts, scheds, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    opts.step()
    scheds.step()
    opts.zero_grad()
    return loss.detach()


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    model = tiny_titan()
    ref_model = copy.deepcopy(model)  # one process, the whole batch: the oracle
    ref_opts, ref_scheds = build(ref_model, process_group="local")
    shard(model)
    opts, scheds = build(model)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses, ref_losses, saved = [], [], None
    for step in range(STEPS):
        if step == SAVE_AT:
            saved = opts.state_dict()
            dcp.save({"model": model.state_dict(), "optimizer": saved, "lr": scheds.state_dict()}, checkpoint_id=ckpt)
        loss = train_step(model, opts, scheds, tokens(step)[rows])
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        ref_losses.append(train_step(ref_model, ref_opts, ref_scheds, tokens(step)).item())
    # resume: another model and containers, loaded from the checkpoint, run the remaining steps
    resumed = shard(tiny_titan(seed=1))
    r_opts, r_scheds = build(resumed)
    state = {"model": resumed.state_dict(), "optimizer": r_opts.state_dict(), "lr": r_scheds.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    resumed.load_state_dict(state["model"])
    r_opts.load_state_dict(state["optimizer"])
    r_scheds.load_state_dict(state["lr"])
    for step in range(SAVE_AT, STEPS):
        train_step(resumed, r_opts, r_scheds, tokens(step)[rows])
    return {"losses": losses, "ref_losses": ref_losses, "keys": sorted(saved), "names": [n for n, _ in model.named_parameters()],
            "params": _full(model), "ref_params": _full(ref_model), "resumed_params": _full(resumed),
            "num_steps": opts.optimizers[0].num_steps, "resumed_num_steps": r_opts.optimizers[0].num_steps,
            "roles": {i.name: i.role for i in r_opts.optimizers[0].infos.values()},
            "qkv": r_opts.optimizers[0].infos["layers.0.attention.qkv_linear.wqkv.weight"]}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_world(2, _worker, str(tmp_path_factory.mktemp("titan") / "ckpt"), timeout_s=300)[0]


def test_roles_come_from_torchtitan_module_names(result):
    roles = result["roles"]
    assert (roles["tok_embeddings.weight"], roles["lm_head.weight"]) == ("embedding", "lm_head")
    assert (roles["layers.0.attention.wo.weight"], roles["layers.1.feed_forward.w2.weight"]) == ("attention.o", "mlp.down")
    assert (roles["layers.1.feed_forward.w1.weight"], roles["layers.1.feed_forward.w3.weight"]) == ("mlp.gate", "mlp.up")
    qkv = result["qkv"]  # torchtitan's FusedQKVLinear rows: [kv_heads, heads_per_kv + 2, head_dim]
    assert (qkv.role, qkv.qkv_layout, qkv.num_heads) == ("attention.qkv", "grouped", 16)


def test_fsdp2_training_equals_one_process(result):
    # measured over 4 steps: losses to 9.5e-7 (one float32 ulp at 8), parameters to 7.2e-7; bounds twice that
    assert result["losses"] == pytest.approx(result["ref_losses"], rel=0, abs=2e-6)
    for name, value in result["params"].items():
        torch.testing.assert_close(value, result["ref_params"][name], rtol=0, atol=1.5e-6, msg=name)
    assert result["losses"][-1] < result["losses"][0]


def test_flat_fqn_state_resumes_bit_for_bit(result):
    params = result["names"]
    # torchtitan's flat state: every key names a parameter by its FQN, or is a param-group field or our counters
    odd = [k for k in result["keys"] if not any(k.startswith((f"state.{n}.", f"param_groups.{n}.")) for n in params)
           and not k.startswith("dist_spectral.0.")]
    assert not odd, odd[:8]
    assert {"dist_spectral.0.num_steps", "dist_spectral.0.skipped_steps"} <= set(result["keys"])
    assert result["resumed_num_steps"] == result["num_steps"] == STEPS
    for name, value in result["params"].items():
        assert torch.equal(value, result["resumed_params"][name]), name
