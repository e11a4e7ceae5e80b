"""``launch/train.py --dry-run --world-size W``: a run config's model, layout and optimizer at a
simulated world size, on ``meta``, without a process group or any allocation.

The model is built on ``meta`` as the training entry builds it (``model.preset``, ``model.dtype``,
``model.config``); the layout ``parallel`` names becomes the planner's
:class:`~dist_spectral.planner.Parallel` (the placements ``wrap_model`` gives, per engine)::

    none      W = 1                      ddp   every tensor whole on every rank (replicas = W)
    fsdp      Shard(0) over W            hsdp  (Replicate(), Shard(0)) over (replicas, W / replicas)
    ep        experts Shard(0) over W / replicas (whole experts per rank), the rest as fsdp / hsdp

and the optimizer's plan and step come from :func:`~dist_spectral.planner.simulate_step` and
:func:`~dist_spectral.predict.predict` (the numbers ``dist-spectral plan`` prints). Added here, per rank:

    parameters, gradients   local elements × bytes of each parameter's dtype (gradients in that dtype)
    optimizer state         the predictor's (fp32), and its peak extra memory during the step
    gathered weights        FSDP2 unshards one unit at a time and prefetches the next: 2 × the largest
                            decoder layer's FSDP-managed weights in the compute dtype (experts under
                            ``expert_dispatch=all_to_all`` are not gathered)
    activations             what autograd keeps per token and layer (below), × tokens per rank
    forward + backward      6 × activated parameters (not the input embedding, a lookup) + attention's
                            3 · s · H · (d_qk + d_v) per layer and token (causal), at the predictor's
                            flop rate; with activation checkpointing one more forward (× 4/3)
    communication           FSDP2: all-gathers (forward, and backward when resharded) and reduce-scatter
                            of each unit, (S − 1)/S of its bytes, + HSDP's all-reduce of the shards over
                            the replicas; DDP: all-reduce; token-routed EP: dispatch and combine of
                            tokens × top-k rows, forward and backward, (S − 1)/S of them leave the rank;
                            at NVLink rates within ``gpus_per_node`` ranks, the network's beyond

Activations per token and decoder layer, in elements of the compute dtype (a flash-style attention
kernel: no s × s scores; d hidden, H / H_kv heads, I / I_e dense / expert intermediate, k experts per
token, E experts)::

    norms 4d  +  attention 2 (H + H_kv) d_qk + (H_kv + H) d_v + 2 (q_lora + kv_lora)
    + dense MLP 4 I   or   MoE E + k (2d + 4 I_e) + 4 I_shared

plus the embedding's output d and the logits (fp32, and their gradient: 8 · vocab bytes) per token.
With activation checkpointing a layer keeps only its input (d), and one layer's full set is live
while it is recomputed. The predicted step is compute + communication + the optimizer step, with no
overlap (an upper bound; FSDP2 overlaps its collectives with compute).
"""
from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass

import numpy as np
import torch

from ..planner import Parallel, Simulation, simulate_step
from ..predict import Prediction, Rates, predict
from .config import ConfigError, RunConfig


@dataclass(frozen=True, eq=False)
class DryRun:
    """A simulated training step; per-rank arrays have one entry per rank (bytes, seconds).

    Attributes:
        parallel (Parallel): the simulated layout.
        simulation (Simulation): the optimizer's plan and per-rank sizes (``simulate_step``).
        prediction (Prediction): the optimizer step's time and memory (``predict``).
        rates (Rates): the hardware rates assumed.
        tokens (int): tokens per rank and step (``data.batch_size × data.seq_len``).
        params (ndarray): parameter bytes per rank.
        grads (ndarray): gradient bytes per rank.
        gathered (int): FSDP2's gathered weights, bytes (the same on every rank).
        activations (int): activation bytes per rank (estimate).
        flops (float): forward and backward flops per rank.
        comm_bytes (ndarray): bytes each rank sends in forward and backward (weights, gradients, tokens).
        compute_s (float): forward and backward seconds per rank.
        comm_s (ndarray): their communication seconds per rank.
    """

    parallel: Parallel
    simulation: Simulation
    prediction: Prediction
    rates: Rates
    tokens: int
    params: np.ndarray
    grads: np.ndarray
    gathered: int
    activations: int
    flops: float
    comm_bytes: np.ndarray
    compute_s: float
    comm_s: np.ndarray

    @property
    def memory(self) -> np.ndarray:
        """Bytes per rank: parameters, gradients, optimizer state and its peak extra, gathered weights, activations."""
        p = self.prediction
        return self.params + self.grads + p.state + p.peak_extra + self.gathered + self.activations

    @property
    def step_s(self) -> np.ndarray:
        """Predicted training step per rank: forward and backward, their communication, the optimizer step."""
        return self.compute_s + self.comm_s + self.prediction.step


def simulated_parallel(cfg: RunConfig, world_size: int, model=None) -> Parallel:
    """The planner's layout for ``cfg.parallel`` at ``world_size`` ranks (see the module docstring).

    Raises:
        ConfigError: the engine is not simulated (deepspeed), ``replicas`` does not divide the world
            size, or (with ``model``) its experts do not split into whole experts per rank.
    """
    p, W = cfg.parallel, world_size
    if W < 1:
        raise ConfigError(f"--world-size {W}: give a number of ranks >= 1")
    if p.engine == "deepspeed":
        raise ConfigError("parallel.engine=deepspeed: the dry run simulates the none, ddp, fsdp, hsdp and ep layouts "
                          "(ZeRO's flat partitions are not simulated); plan the same model with parallel=fsdp")
    if p.engine == "none":
        if W != 1:
            raise ConfigError(f"parallel.engine=none runs one process but --world-size is {W}; use parallel=fsdp, "
                              "hsdp, ep or ddp, or --world-size 1")
        return Parallel(1)
    if p.engine == "ddp":
        return Parallel(W, replicas=W)
    replicas = p.replicas if p.engine in ("hsdp", "ep") else 1
    if W % replicas:
        raise ConfigError(f"parallel.replicas={replicas} does not divide --world-size {W}; HSDP needs world = "
                          "replicas x shard size")
    if p.engine == "ep" and model is not None:
        from ..roles import expert_containers

        containers = {path: e for path, e in expert_containers(model).items() if path}
        if not containers:
            raise ConfigError(f"parallel.engine=ep but {type(model).__name__} has no routed experts; use fsdp")
        size = W // replicas
        bad = {path: e for path, e in containers.items() if e % size}
        if bad:
            path, e = next(iter(bad.items()))
            raise ConfigError(f"parallel.engine=ep keeps whole experts per rank: {path!r} has {e} experts, which do "
                              f"not split over {size} ranks (--world-size {W} / parallel.replicas {replicas}); use a "
                              f"size dividing {e}")
    return Parallel(W, replicas=replicas)


def build_meta_model(cfg: RunConfig):
    """The model the training entry builds, on ``meta`` (nothing allocated)."""
    from ..models import build_model

    return build_model(cfg.model.preset, device="meta", dtype=cfg.model.dtype, **cfg.model.config)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_dims(c) -> tuple[int, int, int, int, int]:
    """(H, H_kv, d_qk, d_v, latent) of a transformers config (MLA: q/kv LoRA ranks as the latent)."""
    d, H = c.hidden_size, c.num_attention_heads
    H_kv = getattr(c, "num_key_value_heads", None) or H
    head = getattr(c, "head_dim", None) or d // H
    d_qk = getattr(c, "qk_head_dim", None) or head
    d_v = getattr(c, "v_head_dim", None) or head
    latent = (getattr(c, "q_lora_rank", None) or 0) + (getattr(c, "kv_lora_rank", None) or 0)
    return H, H_kv, d_qk, d_v, latent


def _layer_index(name: str) -> int | None:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def activation_elements(model, checkpointing: bool) -> int:
    """Activation elements of the compute dtype kept per token, all layers and the embedding's output
    (the logits' fp32 bytes are the caller's; see the module docstring)."""
    from ..models import _top_k
    from ..roles import expert_containers

    c = _text_config(model)
    d = c.hidden_size
    H, H_kv, d_qk, d_v, latent = _attention_dims(c)
    attention = 2 * (H + H_kv) * d_qk + (H_kv + H) * d_v + 2 * latent
    k = _top_k(model) or 0
    dense = 4 * getattr(c, "intermediate_size", 0)
    expert_i = getattr(c, "moe_intermediate_size", None) or getattr(c, "intermediate_size", 0)
    shared = (getattr(c, "n_shared_experts", None) or 0) * expert_i + (getattr(c, "shared_expert_intermediate_size",
                                                                               None) or 0)
    containers = {path: e for path, e in expert_containers(model).items() if path}
    moe_layers = {}
    for path, e in containers.items():
        i = _layer_index(path + ".")
        if i is not None:
            moe_layers[i] = e
    per_layer = []
    for i in range(c.num_hidden_layers):
        mlp = (moe_layers[i] + k * (2 * d + 4 * expert_i) + 4 * shared) if i in moe_layers else dense
        per_layer.append(4 * d + attention + mlp)
    if checkpointing:
        return d * c.num_hidden_layers + max(per_layer, default=0) + d
    return sum(per_layer) + d


def _bandwidth(rates: Rates, group: int) -> float:
    link = rates.bandwidth if group > rates.gpus_per_node else rates.nvlink_bandwidth
    return link * rates.comm_efficiency


def dry_run(cfg: RunConfig, world_size: int, rates: Rates = Rates(), model=None) -> DryRun:
    """Simulate one training step of ``cfg`` at ``world_size`` ranks (see the module docstring).

    Args:
        cfg (RunConfig): the resolved run config.
        world_size (int): simulated ranks.
        rates (Rates): hardware rates (default: ``Rates()``, H100 nodes of 8).
        model (nn.Module | None): the model on ``meta`` (default: built from ``cfg``).
    """
    from ..models import _as_dtype, _top_k, count_parameters
    from ..roles import classify, expert_containers

    model = build_meta_model(cfg) if model is None else model
    parallel = simulated_parallel(cfg, world_size, model)
    o = cfg.optim
    sim = simulate_step(model, parallel, o.recipe, bucket_mb=o.bucket_mb,
                        element_bytes=2 if o.comm_dtype == "bfloat16" else 4, replicate_below=o.replicate_below,
                        **o.overrides)
    pred = predict(sim, rates)
    W = parallel.world_size
    p = cfg.parallel
    compute_dtype = _as_dtype(p.mixed_precision) if p.mixed_precision and p.engine in ("fsdp", "hsdp", "ep") else None
    routed = p.engine == "ep" and p.expert_dispatch == "all_to_all"
    containers = [path for path in expert_containers(model) if path]
    roles = {i.name: i.role for i in classify(model)}

    params = np.zeros(W)
    sizes: dict[int, np.ndarray] = {}
    layer_bytes: dict[int | None, float] = {}
    fsdp_bytes = 0.0  # FSDP-managed elements × their parameter bytes
    for name, t in model.named_parameters():
        expert = t.ndim == 3 and roles.get(name, "").startswith("expert")
        layout = parallel.layout(tuple(t.shape), expert=expert)
        if id(layout) not in sizes:
            sizes[id(layout)] = np.array([layout.local_numel(r) for r in range(W)], dtype=np.float64)
        params += sizes[id(layout)] * t.element_size()
        if routed and any(name.startswith(path + ".") for path in containers):
            continue  # token-routed experts: never gathered, gradients not reduce-scattered
        fsdp_bytes += t.numel() * t.element_size()
        compute = torch.empty((), dtype=compute_dtype or t.dtype).element_size()
        i = _layer_index(name)
        layer_bytes[i] = layer_bytes.get(i, 0.0) + t.numel() * compute

    sharded = p.engine in ("fsdp", "hsdp", "ep")
    replicas = parallel.replicas if sharded else 1
    shard = W // replicas
    gathered = 2 * max((b for i, b in layer_bytes.items() if i is not None), default=0) if sharded and shard > 1 else 0

    c = _text_config(model)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    act_dtype = torch.empty((), dtype=compute_dtype or _as_dtype(cfg.model.dtype) or torch.float32).element_size()
    per_token = activation_elements(model, cfg.model.activation_checkpointing)
    activations = int(tokens * (per_token * act_dtype + 8 * c.vocab_size))

    counts = count_parameters(model)
    embed = model.get_input_embeddings().weight.numel() if model.get_input_embeddings() is not None else 0
    H, _, d_qk, d_v, _ = _attention_dims(c)
    per_token_flops = 6 * (counts.active - embed) + 3 * cfg.data.seq_len * H * (d_qk + d_v) * c.num_hidden_layers
    flops = tokens * per_token_flops * (4 / 3 if cfg.model.activation_checkpointing else 1)
    compute_s = flops / (rates.flops * rates.flops_efficiency)

    comm = 0.0
    collectives = 0
    if sharded and shard > 1:
        gathers = 2 if p.reshard_after_forward else 1
        comm += (gathers * sum(layer_bytes.values()) + fsdp_bytes) * (shard - 1) / shard
        collectives += (gathers + 1) * (len(layer_bytes) + (0 if routed else len(containers)))
    comm_s = comm / _bandwidth(rates, shard) if comm else 0.0
    if sharded and replicas > 1:  # HSDP: the shards' gradients all-reduced over the replicas
        ar = 2 * (replicas - 1) / replicas * fsdp_bytes / shard
        comm += ar
        comm_s += ar / _bandwidth(rates, W)  # replicas are shard ranks apart: across nodes when W > a node
        collectives += len(layer_bytes)
    if p.engine == "ddp" and W > 1:
        ar = 2 * (W - 1) / W * sum(t.numel() * t.element_size() for t in model.parameters())
        comm += ar
        comm_s += ar / _bandwidth(rates, W)
        collectives += 1
    if routed and shard > 1:
        rows = 4 * tokens * (_top_k(model) or 0) * c.hidden_size * act_dtype * len(containers) * (shard - 1) / shard
        comm += rows
        comm_s += rows / _bandwidth(rates, shard)
        collectives += 4 * len(containers)
    comm_s += collectives * rates.latency
    return DryRun(parallel=parallel, simulation=sim, prediction=pred, rates=rates, tokens=tokens, params=params,
                  grads=params.copy(), gathered=int(gathered), activations=activations, flops=float(flops),
                  comm_bytes=np.full(W, comm), compute_s=float(compute_s), comm_s=np.full(W, comm_s))


def _gb(x) -> str:
    x = float(x)
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB"


def print_dry_run(cfg: RunConfig, run: DryRun, out=print) -> None:
    """The plan (as ``dist-spectral plan`` prints it), then memory per rank and the predicted step."""
    from ..cli import _print_plan

    par = run.parallel
    p = cfg.parallel
    layout = p.engine + (f" {par.replicas} replicas" if par.replicas > 1 and p.engine != "ddp" else "")
    if p.engine == "ep":
        layout += f", expert_dispatch={p.expert_dispatch}"
    out(f"dry run: {cfg.model.preset} ({cfg.model.dtype}), recipe {cfg.optim.recipe}, {layout} at a simulated "
        f"world size of {par.world_size}; {run.tokens} tokens per rank and step; on meta, nothing allocated")
    _print_plan(run.simulation, run.prediction, run.rates, types.SimpleNamespace(units=False, buckets=False,
                                                                                 all_ranks=False))
    worst = int(np.argmax(run.memory))
    pred = run.prediction
    out(f"training memory per rank (the largest, rank {worst}): {_gb(run.memory[worst])} = parameters "
        f"{_gb(run.params[worst])} + gradients {_gb(run.grads[worst])} + optimizer state {_gb(pred.state[worst])} "
        f"+ optimizer peak extra {_gb(pred.peak_extra[worst])} + FSDP2 gathered weights {_gb(run.gathered)} + "
        f"activations {_gb(run.activations)} (estimate{', activation checkpointing' if cfg.model.activation_checkpointing else ''})")
    slow = int(np.argmax(run.step_s))
    out(f"predicted training step (rank {slow}): {run.step_s[slow] * 1e3:.1f} ms = forward and backward "
        f"{run.compute_s * 1e3:.1f} ms ({run.flops / 1e12:.3g} TFLOP) + their communication {run.comm_s[slow] * 1e3:.1f} ms "
        f"({_gb(run.comm_bytes[slow])} sent) + optimizer {pred.step[slow] * 1e3:.2f} ms; no overlap assumed "
        "(see dist_spectral/training/dryrun.py)")


def main(cfg: RunConfig, world_size: int) -> int:
    """Print the dry run of ``cfg`` at ``world_size`` ranks; a layout error is one line, exit status 2."""
    import sys

    try:
        run = dry_run(cfg, world_size)
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print_dry_run(cfg, run)
    return 0


__all__ = ["DryRun", "dry_run", "simulated_parallel", "activation_elements", "print_dry_run", "build_meta_model"]
