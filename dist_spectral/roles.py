"""Parameter roles: which class of weight each parameter is (see ``classify``).

The optimizer picks an update rule per role (``docs/update-rules.md#rules-by-parameter-role``).
``classify`` walks ``model.named_parameters()`` once and decides, first match wins:

1. ``vector``     every 0-D/1-D tensor (norms, biases, router bias, attention sinks).
2. ``embedding``  the input embedding (by Parameter identity with ``get_input_embeddings()``; ``tied``
                  when ``get_output_embeddings()`` holds the very same Parameter), then any other
                  ``nn.Embedding`` table.
3. ``lm_head``    the untied output embedding (identity with ``get_output_embeddings()``).
4. ``expert.*``   tensors inside an expert container: a module holding 3-D ``[E, ·, ·]`` weights
                  (transformers 5.x ``*Experts``) or a ``ModuleList``/``ModuleDict`` named ``experts``
                  of per-expert MLPs. 2-D expert biases (GPT-OSS ``gate_up_proj_bias [E, 2r]``) are
                  ``vector``.
5. ``router``     a 2-D weight owned by the MoE block (the parent of an expert container) or one of its
                  direct children, with one row per expert.
6. ``attention.*`` projections of an attention module, by name (``q_proj``/``wq``, fused ``qkv_proj``
                  and GPT-NeoX/Falcon ``query_key_value``, output ``o_proj``/``out_proj``/``dense``, MLA
                  ``q_a_proj`` ...), and ``nn.MultiheadAttention``'s ``in_proj_weight`` (or its separate
                  ``q/k/v_proj_weight``), with head counts from the module or the model config.
7. ``mlp.*``      MLP projections by name (``gate_proj``/``w1``, ``up_proj``/``w3``/``dense_h_to_4h``,
                  ``down_proj``/``w2``/``dense_4h_to_h``, fused ``gate_up_proj``), dense MLPs and shared
                  experts alike.
8. ``hidden``     any other matrix. ``format_table`` marks it, and ``classify`` warns once
                  (:class:`FallbackRoleWarning`) when the classifier should have known it: any matrix of
                  a transformers model (one with a ``config``), or one inside an attention module. A plain
                  module's other matrices (an ``nn.Linear`` stack) are what ``hidden`` is for and pass
                  silently. Silence the warning with
                  ``warnings.filterwarnings("ignore", category=dist_spectral.roles.FallbackRoleWarning)``.

Names are always the fully qualified ``named_parameters()`` names, so wrappers work unchanged: DDP
(``module.`` prefix), ``torch.compile`` (``_orig_mod.``) and FSDP2 ``fully_shard`` (whose wrapped module
classes become ``FSDP<Name>`` and whose parameters become DTensors; ``DTensor.shape`` is global).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParamInfo:
    """What the optimizer needs to know about one parameter, independent of how it is stored.

    Attributes:
        name (str): fully qualified name, as in ``model.named_parameters()``.
        shape (tuple[int, ...]): global shape.
        role (str): ``embedding``, ``lm_head``, ``attention.{q,k,v,o,qkv,latent}``,
            ``mlp.{gate,up,gate_up,down}``, ``expert.{gate,up,gate_up,down}``, ``router``,
            ``hidden`` or ``vector``.
        module_type (str): class name of the module that owns the parameter.
        num_heads (int | None): attention heads in this tensor (q/o: query heads, k/v: kv heads).
        head_dim (int | None): attention head size.
        qkv_split (tuple[int, int, int] | None): rows of q, k and v in a fused qkv weight.
        qkv_layout (str | None): how a fused qkv weight orders those rows: ``"stacked"`` (all q rows,
            then k, then v: Phi-3 ``qkv_proj``, ``nn.MultiheadAttention``, Falcon multi-query) or
            ``"grouped"`` (per kv head: its query heads, then its key head, then its value head, i.e.
            ``[kv_heads, q_heads / kv_heads + 2, head_dim]``: Falcon's new decoder architecture, and
            GPT-NeoX / Falcon ``[heads, 3, head_dim]`` with kv_heads = heads). Either way each run of
            ``head_dim`` rows is one head of q, k or v.
        num_experts (int | None): experts on dim 0 of a 3-D expert tensor.
        fused (str | None): fused gate/up layout: ``"halves"`` (gate rows, then up rows, along the
            output axis) or ``"interleaved"`` (gate = ``[..., ::2]``, up = ``[..., 1::2]``).
        transposed (bool): the weight is applied as ``x @ W`` (in × out) instead of ``nn.Linear``'s
            out × in, so its output/neuron axis is the last one.
        tied (bool): an embedding shared with the LM head.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    module_type: str = ""
    num_heads: int | None = None
    head_dim: int | None = None
    qkv_split: tuple[int, int, int] | None = None
    qkv_layout: str | None = None
    num_experts: int | None = None
    fused: str | None = None
    transposed: bool = False
    tied: bool = False


ROLES = (
    "embedding", "lm_head",
    "attention.q", "attention.k", "attention.v", "attention.o", "attention.qkv", "attention.latent",
    "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down",
    "expert.gate", "expert.up", "expert.gate_up", "expert.down",
    "router", "hidden", "vector",
)

class FallbackRoleWarning(UserWarning):
    """Matrices that ``classify`` could not place and labelled ``hidden`` (see the module docstring)."""


# Leaf module (or, for 3-D expert tensors, parameter) names. HF names first, then the Meta/torchtitan
# ``wq``/``w1`` style. Only names whose tensor layout is known are listed; ``_qkv_layout`` knows how
# each fused qkv orders its rows.
_ATTENTION_NAMES = {
    "q_proj": "q", "wq": "q", "query": "q",
    "k_proj": "k", "wk": "k", "key": "k",
    "v_proj": "v", "wv": "v", "value": "v",
    "o_proj": "o", "wo": "o", "out_proj": "o", "dense": "o",
    "qkv_proj": "qkv", "wqkv": "qkv", "Wqkv": "qkv", "query_key_value": "qkv",
    # DeepSeek MLA low-rank projections: whole matrices, the head structure lives in the latent.
    "q_a_proj": "latent", "q_b_proj": "latent", "kv_a_proj_with_mqa": "latent", "kv_a_proj": "latent",
    "kv_b_proj": "latent",
    # torchtitan's DeepSeek-V3 MLA: the same low-rank projections.
    "wq_a": "latent", "wq_b": "latent", "wkv_a": "latent", "wkv_b": "latent",
}
_ATTENTION_MODULE_NAMES = {"self_attn", "attn", "attention", "self_attention"}
_MLP_NAMES = {
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "dense_h_to_4h": "up",
    "down_proj": "down", "w2": "down", "dense_4h_to_h": "down",
    "gate_up_proj": "gate_up", "w13": "gate_up",
}
_EXPERT_LIST_NAME = re.compile(r"^(local_)?experts$")
# torchtitan (0.3) keeps q/k/v in a child of the attention module (``attention.qkv_linear.wqkv``, or
# ``.wq``/``.wk``/``.wv`` unfused), names its 3-D expert tensors by their axes (``w1_EFD``: experts,
# ffn rows, model columns), wraps them as ``moe.routed_experts.inner_experts`` and routes with
# ``moe.router.gate``.
_QKV_HOLDER_NAMES = {"qkv_linear"}
_EXPERT_AXES = re.compile(r"^(?P<base>.+)_E(?P<out>[DF])(?P<inp>[DF])$")
_EXPERT_WRAPPER_NAMES = {"routed_experts"}
_ROUTER_HOLDER_NAMES = {"router"}


@dataclass(frozen=True)
class _ExpertContainer:
    """An expert container found in the module tree (private to this file)."""

    path: str
    num_experts: int
    batched: bool  # 3-D ``[E, ·, ·]`` tensors (True) or a list of per-expert modules (False)
    transposed: bool = False
    fused: str = "halves"


def module_type_name(module: nn.Module) -> str:
    """Class name of ``module``, without the ``FSDP`` prefix that FSDP2 ``fully_shard`` adds.

    ``fully_shard`` swaps the class of a module to a dynamic ``FSDP<Name>(FSDPModule, <Name>)``; the
    prefix is only stripped when ``FSDPModule`` is in the MRO, so a user class called ``FSDPFoo`` keeps
    its name. No ``torch.distributed`` import is needed for that.
    """
    name = type(module).__name__
    if name.startswith("FSDP") and any(c.__name__ == "FSDPModule" for c in type(module).__mro__[1:]):
        return name[len("FSDP"):]
    return name


def _parent(path: str) -> str:
    """Dotted path of the parent (``""`` for a top-level name)."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def _leaf(path: str) -> str:
    """Last component of a dotted path."""
    return path.rsplit(".", 1)[-1]


def _find_text_config(model: nn.Module):
    """The (text) config of the outermost module that has one, or ``None`` for plain modules."""
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return config
    return None


def _io_embeddings(model: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """Weights of the input and output embeddings.

    Uses ``get_input_embeddings``/``get_output_embeddings`` of the outermost module providing them (so
    a DDP or FSDP wrapper is looked through). Plain modules fall back to the first ``nn.Embedding`` and
    to the last ``nn.Linear`` with the embedding's ``(vocab, d)`` weight shape.
    """
    inp = out = None
    for _, module in model.named_modules():
        if inp is None and callable(getattr(module, "get_input_embeddings", None)):
            try:
                inp = module.get_input_embeddings()
            except NotImplementedError:
                inp = None
        if out is None and callable(getattr(module, "get_output_embeddings", None)):
            out = module.get_output_embeddings()
        if inp is not None and out is not None:
            break
    in_weight = getattr(inp, "weight", None)
    out_weight = getattr(out, "weight", None)
    if in_weight is None:
        in_weight = next((m.weight for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if out_weight is None and in_weight is not None and inp is None:
        heads = [m.weight for m in model.modules()
                 if isinstance(m, nn.Linear) and tuple(m.weight.shape) == tuple(in_weight.shape)]
        out_weight = heads[-1] if heads else None
    return in_weight, out_weight


def _infer_expert_transposed(shapes: dict[str, tuple[int, ...]], hidden_size: int | None) -> bool:
    """Whether 3-D expert weights are stored ``[E, in, out]`` (``x @ W``), from their shapes.

    With both ``gate_up`` and ``down`` present the answer is unique: ``[E, 2r, d]`` + ``[E, d, r]`` vs
    ``[E, d, 2r]`` + ``[E, r, d]`` cannot both fit for r > 0. Otherwise ``down`` is compared with the
    model's hidden size; if that is undecidable too, the ``nn.Linear`` convention (False) is assumed.
    """
    gate_up, down = shapes.get("gate_up"), shapes.get("down")
    if gate_up is not None and down is not None:
        normal = gate_up[2] == down[1] and gate_up[1] == 2 * down[2]
        flipped = gate_up[1] == down[2] and gate_up[2] == 2 * down[1]
        if normal != flipped:
            return flipped
    if down is not None and hidden_size:
        normal, flipped = down[1] == hidden_size, down[2] == hidden_size
        if normal != flipped:
            return flipped
    return False


def _expert_part(param_name: str) -> str | None:
    """``gate``/``up``/``down``/``gate_up`` for a 3-D expert tensor name, else ``None``."""
    if "gate_up" in param_name or param_name == "w13":
        return "gate_up"
    if (axes := _EXPERT_AXES.match(param_name)) is not None:
        param_name = axes["base"]
    return _MLP_NAMES.get(param_name) or _MLP_NAMES.get(param_name + "_proj")


def _axes_transposed(names) -> bool | None:
    """Whether 3-D expert tensors named by their axes (torchtitan ``w1_EFD``, ``w2_EDF``) are stored
    ``[E, in, out]``: gate/up produce ffn rows (F) and down model rows (D) in ``nn.Linear``'s layout;
    ``None`` when the names carry no axes."""
    flags = set()
    for name in names:
        axes, part = _EXPERT_AXES.match(name), _expert_part(name)
        if axes is None or part is None:
            return None
        flags.add(axes["out"] != ("D" if part == "down" else "F"))
    return flags.pop() if len(flags) == 1 else None


def _find_expert_containers(model: nn.Module, hidden_size: int | None) -> dict[str, _ExpertContainer]:
    """All expert containers, by module path.

    A batched container is a module whose class or name mentions experts and that owns 3-D tensors
    directly (transformers 5.x ``*Experts``; its ``is_transposed``/``is_concatenated`` attributes, set by
    ``use_experts_implementation``, are trusted over shape inference). A list container is a
    ``ModuleList``/``ModuleDict`` named ``experts`` or ``local_experts`` (one MLP per expert).
    """
    found = {}
    for path, module in model.named_modules():
        leaf = _leaf(path)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            if _EXPERT_LIST_NAME.match(leaf) and len(module) > 0:
                found[path] = _ExpertContainer(path, len(module), batched=False)
            continue
        direct = dict(module.named_parameters(recurse=False))
        weights3d = {n: p for n, p in direct.items() if p.ndim == 3}
        if not weights3d or "expert" not in (leaf + module_type_name(module)).lower():
            continue
        num_experts = {p.shape[0] for p in weights3d.values()}
        if len(num_experts) != 1:
            raise ValueError(f"expert container {path!r} ({module_type_name(module)}) holds 3-D tensors "
                             f"with different expert counts: { {n: tuple(p.shape) for n, p in weights3d.items()} }")
        transposed = getattr(module, "is_transposed", None)
        if transposed is None:
            transposed = _axes_transposed(weights3d)
        if transposed is None:
            shapes = {_expert_part(n): tuple(p.shape) for n, p in weights3d.items()}
            transposed = _infer_expert_transposed(shapes, hidden_size)
        concatenated = getattr(module, "is_concatenated", True)
        found[path] = _ExpertContainer(path, num_experts.pop(), batched=True, transposed=bool(transposed),
                                       fused="halves" if concatenated else "interleaved")
    return found


def expert_containers(model: nn.Module) -> dict[str, int]:
    """Expert containers of ``model`` (module path -> number of experts), 3-D and per-expert lists."""
    config = _find_text_config(model)
    found = _find_expert_containers(model, _first_int(getattr(config, "hidden_size", None)))
    return {path: c.num_experts for path, c in found.items()}


def _containing(path: str, containers: dict[str, _ExpertContainer]) -> _ExpertContainer | None:
    """The expert container that ``path`` (a module path) is inside of, or is."""
    probe = path
    while True:
        if probe in containers:
            return containers[probe]
        if not probe:
            return None
        probe = _parent(probe)


def _expert_info(name, shape, owner_path, owner_type, container: _ExpertContainer) -> ParamInfo:
    """Role of a parameter inside an expert container."""
    if container.batched:
        leaf = _leaf(name)
        part = _expert_part(leaf)
        if len(shape) == 3 and part is not None:
            return ParamInfo(name, shape, f"expert.{part}", owner_type, num_experts=container.num_experts,
                             fused=container.fused if part == "gate_up" else None,
                             transposed=container.transposed)
        if len(shape) == 2 and "bias" in leaf:  # per-expert bias rows, e.g. GPT-OSS [E, 2r]
            return ParamInfo(name, shape, "vector", owner_type)
        raise ValueError(f"unknown tensor {name!r} {shape} in expert container {container.path!r} "
                         f"({owner_type}); expected gate_up/gate/up/down weights or *_bias rows. Name it "
                         f"like the HF experts, or extend dist_spectral.roles._expert_part")
    part = _MLP_NAMES.get(_leaf(owner_path))
    if part is None:
        return ParamInfo(name, shape, "hidden", owner_type)
    return ParamInfo(name, shape, f"expert.{part}", owner_type, fused="halves" if part == "gate_up" else None)


def _router_blocks(containers: dict[str, _ExpertContainer]) -> dict[str, int]:
    """MoE blocks (parents of expert containers) mapped to their number of experts."""
    blocks = {_parent(c.path): c.num_experts for c in containers.values()}
    for c in containers.values():  # torchtitan: moe.routed_experts.inner_experts -> the MoE block is moe
        if _leaf(_parent(c.path)) in _EXPERT_WRAPPER_NAMES:
            blocks[_parent(_parent(c.path))] = c.num_experts
    return blocks


def _is_router(shape: tuple[int, ...], owner_path: str, blocks: dict[str, int]) -> bool:
    """A 2-D ``[E, d]`` weight owned by an MoE block or by one of its direct children (``mlp.gate``).

    Deeper modules (a shared expert's ``gate_proj``) are excluded, and Qwen2-MoE's ``shared_expert_gate``
    (``[1, d]``) fails the row count.
    """
    if len(shape) != 2:
        return False
    candidates = {owner_path, _parent(owner_path)}
    if _leaf(_parent(owner_path)) in _ROUTER_HOLDER_NAMES:  # torchtitan: moe.router.gate
        candidates.add(_parent(_parent(owner_path)))
    return any(block in blocks and shape[0] == blocks[block] for block in candidates)


def _is_attention(owner_path: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The attention module owning the projection at ``owner_path``, or ``None``."""
    parent_path = _parent(owner_path)
    if _leaf(parent_path) in _QKV_HOLDER_NAMES:  # torchtitan: attention.qkv_linear.wqkv
        parent_path = _parent(parent_path)
    parent = modules.get(parent_path)
    if parent is None or parent_path == owner_path:
        return None
    type_name = module_type_name(parent).lower()
    if "attention" in type_name or "attn" in type_name or _leaf(parent_path) in _ATTENTION_MODULE_NAMES:
        return parent
    return None


def _first_int(*values) -> int | None:
    """First value that is a positive int."""
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def _head_counts(attn: nn.Module, config) -> tuple[int | None, int | None]:
    """(query heads, kv heads) for one attention module.

    Per-module attributes win over the model config, because some models vary them by layer (Gemma 4
    sets ``num_key_value_groups`` per layer); ``num_key_value_groups`` is present on nearly all HF
    attention modules, ``num_heads`` only on some.
    """
    cfg = getattr(attn, "config", None)
    cfg = cfg if hasattr(cfg, "num_attention_heads") else config
    n_q = _first_int(getattr(attn, "num_heads", None), getattr(attn, "num_attention_heads", None),
                     getattr(attn, "n_heads", None), getattr(cfg, "num_attention_heads", None))
    groups = _first_int(getattr(attn, "num_key_value_groups", None))
    n_kv = _first_int(getattr(attn, "num_key_value_heads", None), getattr(attn, "num_kv_heads", None),
                      getattr(attn, "n_kv_heads", None),
                      n_q // groups if n_q and groups else None,
                      getattr(cfg, "num_key_value_heads", None), n_q)
    return n_q, n_kv


def _attention_info(name, shape, owner_path, owner_type, part, attn, config) -> ParamInfo:
    """ParamInfo for an ``nn.Linear``-layout attention projection.

    Heads split the output rows of q/k/v/qkv and the input columns of o; the head size is derived from
    the tensor and the head count, so models whose head_dim differs per projection (DeepSeek MLA:
    q/k 192, v/o 128) or per layer come out right.
    """
    role = f"attention.{part}"
    if len(shape) != 2:
        return ParamInfo(name, shape, "hidden", owner_type)
    n_q, n_kv = _head_counts(attn, config)
    out_dim, in_dim = shape
    if part == "latent":
        if _leaf(owner_path) == "q_b_proj" and n_q and out_dim % n_q == 0:
            # q_b_proj rows are [H, qk_nope + qk_rope]: informative, the rule stays whole-matrix.
            return ParamInfo(name, shape, role, owner_type, num_heads=n_q, head_dim=out_dim // n_q)
        return ParamInfo(name, shape, role, owner_type)
    if part == "qkv":
        head_dim = _first_int(getattr(attn, "head_dim", None), getattr(attn, "head_size", None),
                              getattr(config, "head_dim", None))
        layout, n_kv = _qkv_layout(owner_path, attn, n_q, n_kv)
        return _qkv_info(name, shape, owner_type, n_q, n_kv, head_dim, layout)
    heads, size = (n_kv, out_dim) if part in ("k", "v") else (n_q, in_dim if part == "o" else out_dim)
    if heads is None:  # a plain module without head information: whole-matrix
        return ParamInfo(name, shape, role, owner_type)
    if size % heads:
        raise ValueError(f"attention {part} {name!r} {shape}: {size} is not divisible by {heads} heads "
                         f"(from {owner_type} attributes / model config)")
    return ParamInfo(name, shape, role, owner_type, num_heads=heads, head_dim=size // heads)


def _qkv_layout(owner_path: str, attn: nn.Module, n_q: int | None, n_kv: int | None) -> tuple[str, int | None]:
    """(row layout, kv heads) of a fused qkv projection.

    Falcon's module flags say which of its three layouts it uses (``new_decoder_architecture``:
    grouped by its kv heads; ``multi_query``: stacked with one kv head; neither: one group per head,
    whatever ``num_kv_heads`` says). GPT-NeoX's and BLOOM's ``query_key_value`` is viewed as
    ``[heads, 3, head_dim]``; every other fused name is stacked.
    """
    if getattr(attn, "new_decoder_architecture", False):
        return "grouped", n_kv
    if _leaf(_parent(owner_path)) in _QKV_HOLDER_NAMES and hasattr(getattr(attn, _leaf(_parent(owner_path))), "heads_per_kv"):
        return "grouped", n_kv  # torchtitan FusedQKVLinear: [kv_heads, heads_per_kv + 2, head_dim]
    if getattr(attn, "multi_query", False):
        return "stacked", 1
    if _leaf(owner_path) == "query_key_value":
        return "grouped", n_q
    return "stacked", n_kv


def _qkv_info(name, shape, owner_type, n_q, n_kv, head_dim, layout) -> ParamInfo:
    """ParamInfo of a fused ``[(q + 2 kv) * head_dim, d]`` qkv weight; rows must match the heads."""
    out_dim = shape[0]
    if not (n_q and n_kv and head_dim) or (n_q + 2 * n_kv) * head_dim != out_dim:
        raise ValueError(f"fused qkv {name!r} {shape} ({layout}): {out_dim} output rows do not match "
                         f"(heads={n_q} + 2*kv_heads={n_kv}) * head_dim={head_dim}; set the head counts on "
                         f"the {owner_type} module or the model config")
    split = (n_q * head_dim, n_kv * head_dim, n_kv * head_dim)
    return ParamInfo(name, shape, "attention.qkv", owner_type, num_heads=n_q, head_dim=head_dim,
                     qkv_split=split, qkv_layout=layout)


def _multihead_info(name, shape, owner_type, mha: nn.MultiheadAttention) -> ParamInfo:
    """``nn.MultiheadAttention``'s own tensors: ``in_proj_weight`` is ``[q; k; v]`` (3E x E), or
    separate ``q/k/v_proj_weight`` (E x E, E x kdim, E x vdim) when key and value widths differ;
    ``bias_k``/``bias_v`` ([1, 1, E]) are vectors. Its ``out_proj`` is a child Linear (``attention.o``)."""
    leaf = _leaf(name)
    heads, head_dim = mha.num_heads, mha.head_dim
    if leaf == "in_proj_weight":
        return _qkv_info(name, shape, owner_type, heads, heads, head_dim, "stacked")
    part = {"q_proj_weight": "q", "k_proj_weight": "k", "v_proj_weight": "v"}.get(leaf)
    if part is not None:
        return ParamInfo(name, shape, f"attention.{part}", owner_type, num_heads=heads, head_dim=head_dim)
    if leaf in ("bias_k", "bias_v"):
        return ParamInfo(name, shape, "vector", owner_type)
    return ParamInfo(name, shape, "hidden", owner_type)


def _warn_fallbacks(infos: list[ParamInfo], modules: dict[str, nn.Module], has_config: bool) -> None:
    """One :class:`FallbackRoleWarning` naming the ``hidden`` matrices the classifier should have known."""
    unknown = [i for i in infos if i.role == "hidden"
               and (has_config or _is_attention(_parent(i.name), modules) is not None
                    or re.search(r"attn|attention", type(modules[_parent(i.name)]).__name__, re.I))]
    if not unknown:
        return
    shown = ", ".join(f"{i.name} {'x'.join(map(str, i.shape))} ({i.module_type})" for i in unknown[:4])
    more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
    warnings.warn(
        f"dist_spectral.classify: {len(unknown)} matri{'x has' if len(unknown) == 1 else 'ces have'} no recognised "
        f"role and fell back to 'hidden' (they get the recipe's rule for role hidden: whole-matrix Muon in most "
        f"built-in recipes): {shown}{more}. If they are attention or MLP projections, name them like a supported "
        f"model (see dist_spectral.roles) or pass build_optimizer(..., infos=[ParamInfo, ...]); if 'hidden' is "
        f"right, silence this with warnings.filterwarnings('ignore', category=dist_spectral.roles.FallbackRoleWarning)",
        FallbackRoleWarning, stacklevel=3)


def classify(model: nn.Module) -> list[ParamInfo]:
    """Role and layout of every parameter, in ``model.named_parameters()`` order.

    Args:
        model (nn.Module): a transformers ``*ForCausalLM``, a plain module, or either wrapped by DDP,
            FSDP2 ``fully_shard`` or ``torch.compile``.

    Returns:
        list[ParamInfo]: one entry per (deduplicated) parameter, with global shapes.

    Raises:
        ValueError: an expert container holds an unknown 3-D tensor, or head counts do not divide an
            attention projection (the message names the parameter and shape).
    """
    config = _find_text_config(model)
    hidden_size = _first_int(getattr(config, "hidden_size", None))
    in_weight, out_weight = _io_embeddings(model)
    tied = in_weight is not None and in_weight is out_weight
    modules = dict(model.named_modules())
    containers = _find_expert_containers(model, hidden_size)
    blocks = _router_blocks(containers)

    infos = []
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        owner_path = _parent(name)
        owner = modules[owner_path]
        owner_type = module_type_name(owner)
        container = _containing(owner_path, containers)
        if len(shape) < 2:
            info = ParamInfo(name, shape, "vector", owner_type)
        elif param is in_weight:
            info = ParamInfo(name, shape, "embedding", owner_type, tied=tied)
        elif param is out_weight:
            info = ParamInfo(name, shape, "lm_head", owner_type)
        elif isinstance(owner, nn.Embedding):
            info = ParamInfo(name, shape, "embedding", owner_type)
        elif container is not None:
            info = _expert_info(name, shape, owner_path, owner_type, container)
        elif _is_router(shape, owner_path, blocks):
            info = ParamInfo(name, shape, "router", owner_type)
        elif isinstance(owner, nn.MultiheadAttention):
            info = _multihead_info(name, shape, owner_type, owner)
        elif _leaf(owner_path) in _ATTENTION_NAMES and (attn := _is_attention(owner_path, modules)) is not None:
            part = _ATTENTION_NAMES[_leaf(owner_path)]
            info = _attention_info(name, shape, owner_path, owner_type, part, attn, config)
        elif _leaf(owner_path) in _MLP_NAMES and _leaf(name) == "weight":
            part = _MLP_NAMES[_leaf(owner_path)]
            fused = "halves" if part == "gate_up" else None
            info = ParamInfo(name, shape, f"mlp.{part}", owner_type, fused=fused)
        else:
            info = ParamInfo(name, shape, "hidden", owner_type)
        infos.append(info)
    _warn_fallbacks(infos, modules, config is not None)
    return infos


def _layout_note(info: ParamInfo) -> str:
    """Short human-readable layout description for ``format_table``."""
    notes = []
    if info.num_experts is not None:
        notes.append(f"E={info.num_experts}")
    if info.num_heads is not None:
        notes.append(f"heads={info.num_heads}x{info.head_dim}")
    if info.qkv_split is not None:
        notes.append("qkv=" + "/".join(map(str, info.qkv_split)) + (f" {info.qkv_layout}" if info.qkv_layout else ""))
    if info.fused:
        notes.append(f"fused={info.fused}")
    if info.transposed:
        notes.append("transposed")
    if info.tied:
        notes.append("tied")
    return " ".join(notes)


def format_table(infos: list[ParamInfo]) -> str:
    """Aligned text table: name, shape, role, module type and layout notes, one row per parameter.

    Matrices that fell through to ``hidden`` are marked with ``*`` so an unrecognised layer is visible.
    """
    header = ("name", "shape", "role", "module", "layout")
    rows = [header] + [
        (i.name, "x".join(map(str, i.shape)) or "()", i.role + (" *" if i.role == "hidden" else ""),
         i.module_type, _layout_note(i))
        for i in infos
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines = [line.rstrip() for line in lines]
    lines.insert(1, "-" * max(len(line) for line in lines))
    if any(i.role == "hidden" for i in infos):
        lines.append("* hidden: no specific role recognised; gets the generic matrix rule (Muon)")
    return "\n".join(lines)
