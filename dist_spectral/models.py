"""Model presets: YAML files naming a transformers architecture and its config, built at random init.

A preset is a YAML file::

    family: olmoe            # a transformers ``model_type``: llama, qwen3, gemma3_text, olmoe, ...
    description: ...         # optional, one line
    published:               # optional: published parameter counts, checked by the tests
      total: 30532122624
      active: 3300000000
    config:                  # keyword arguments of the family's config class
      hidden_size: 64
      ...

Where presets live. The YAML files ship inside the package, in ``dist_spectral/configs/models/``
next to the recipes, parallel layouts and DeepSpeed configs, so a wheel install finds them as a
checkout does (see :func:`dist_spectral.recipes.configs_dir`). The environment variable
``DIST_SPECTRAL_CONFIG_DIR`` (a directory with a ``models/`` folder) is looked in first. A path to any
YAML file always works. Only the run configs (``configs/runs``) stay at the repository root: they
are examples of jobs, read by path.

``family`` is the transformers ``model_type``, so every causal LM that ``AutoModelForCausalLM`` knows
works without a table here.
"""
from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .roles import classify, expert_containers

CONFIG_DIR_ENV = "DIST_SPECTRAL_CONFIG_DIR"
_PRESET_KEYS = {"family", "description", "published", "config"}


def presets_dir() -> Path:
    """Directory holding the model presets (``dist_spectral/configs/models``).

    Raises:
        FileNotFoundError: neither ``$DIST_SPECTRAL_CONFIG_DIR/models`` nor the package's copy exists.
    """
    candidates = []
    if os.environ.get(CONFIG_DIR_ENV):
        candidates.append(Path(os.environ[CONFIG_DIR_ENV]) / "models")
    candidates.append(Path(__file__).resolve().parent / "configs" / "models")
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"model presets not found (looked in {', '.join(map(str, candidates))}). Reinstall the package "
        f"(its configs/models folder is missing), set {CONFIG_DIR_ENV} to a directory with a models/ folder, "
        f"or pass a path to a YAML file")


def list_presets() -> list[str]:
    """Names of the presets in :func:`presets_dir` (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name or a YAML path to an existing file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model preset file {str(path)!r} does not exist")
        return path
    path = presets_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {str(name_or_path)!r}; available: {', '.join(list_presets())}")
    return path


def load_preset(name_or_path: str | os.PathLike) -> dict:
    """The validated contents of a preset file (``family``, ``config`` and optional keys)."""
    path = _preset_path(name_or_path)
    with open(path) as f:
        preset = yaml.safe_load(f)
    if not isinstance(preset, dict) or "family" not in preset:
        raise ValueError(f"{path}: a model preset needs a top-level 'family' (a transformers model_type)")
    unknown = set(preset) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_PRESET_KEYS)}")
    preset.setdefault("config", {})
    return preset


def _config_class(family: str):
    """The transformers config class registered for ``family`` (a ``model_type``)."""
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        raise ValueError(f"unknown model family {family!r}: not a transformers model_type "
                         f"(e.g. llama, qwen3, gemma3_text, olmoe, qwen3_moe, mixtral, gpt_oss, deepseek_v3)")
    return CONFIG_MAPPING[family]


def _check_config_keys(family: str, kwargs: dict, where: str) -> None:
    """Reject config keys that nothing reads: transformers would store a typo silently.

    A key is accepted when the config class declares it, or when the family's modeling code reads it
    with ``getattr(config, "key", ...)``/``config.key`` (Qwen3-MoE's config declares no ``head_dim``,
    yet the real checkpoints need head_dim 128 != width / heads, and the model reads it that way).
    """
    cls = _config_class(family)
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    default = cls()
    unknown = [k for k in kwargs if k not in known and not hasattr(default, k)]
    if unknown:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        source = inspect.getsource(inspect.getmodule(MODEL_FOR_CAUSAL_LM_MAPPING[cls]))
        read = r"config\.{0}\b|getattr\(\s*config\s*,\s*[\"']{0}[\"']"
        unknown = [k for k in unknown if not re.search(read.format(re.escape(k)), source)]
    if unknown:
        raise ValueError(f"{where}: {cls.__name__} has no field(s) {sorted(unknown)} and the {family} "
                         f"model does not read them")


def load_model_config(name_or_path: str | os.PathLike, **overrides):
    """Build the transformers config of a preset.

    Args:
        name_or_path (str | PathLike): preset name in ``dist_spectral/configs/models`` or a path to a YAML file.
        **overrides: config fields replacing the preset's (top-level only; a dict replaces a dict).

    Returns:
        transformers.PretrainedConfig: the family's config class, e.g. ``OlmoeConfig``.
    """
    from transformers import AutoConfig

    preset = load_preset(name_or_path)
    family = preset["family"]
    _check_config_keys(family, preset["config"], f"preset {str(name_or_path)!r}")
    _check_config_keys(family, overrides, "overrides")
    return AutoConfig.for_model(family, **{**preset["config"], **overrides})


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``"bfloat16"``/``"bf16"``; ``None`` and dtypes pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16")
    return value


def build_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None, seed: int | None = None, **config_overrides):
    """A randomly initialised transformers ``*ForCausalLM`` for a preset.

    Args:
        name_or_path (str | PathLike): preset name or YAML path (see ``load_model_config``).
        device (str | torch.device): where parameters are created; ``"meta"`` allocates nothing, for
            planning at 235B scale in seconds (default: ``"cpu"``).
        dtype (torch.dtype | str | None): parameter dtype (default: ``None``, float32). What
            transformers keeps in fp32 at this dtype stays fp32 (see :func:`keep_in_fp32`), so a bf16
            model can hold fp32 parameters (DeepSeek-V3's router).
        seed (int | None): the seed of :func:`init_weights` (default: ``None``: one drawn from torch's
            global generator). Ignored on ``meta``, where nothing is initialised.
        **config_overrides: config fields replacing the preset's.

    Returns:
        transformers.PreTrainedModel: e.g. ``OlmoeForCausalLM``, in train mode.
    """
    from transformers import AutoModelForCausalLM

    config = load_model_config(name_or_path, **config_overrides)
    dtype = _as_dtype(dtype)
    # Always built on meta, then allocated and initialised by init_weights: the weights a host build
    # gets are the ones a sharded meta build gets (see materialize), whatever the layout.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keep_in_fp32(model, dtype if dtype is not None else torch.get_default_dtype())
    if torch.device(device).type != "meta":
        if seed is None:
            seed = int(torch.randint(2 ** 62, ()))  # unseeded: from torch's global generator, as before
        materialize(model, device, seed)
    return model.train()


def _fp32_plan(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """transformers' keep-in-fp32 patterns for a model loaded in ``dtype``, as its ``from_pretrained``
    decides them in the installed version.

    transformers 5.x names modules to keep in fp32 on the model class: ``_keep_in_fp32_modules_strict``
    under fp16 and bf16, ``_keep_in_fp32_modules`` under fp16 (newer 5.x, ``_get_dtype_plan``) or under
    any dtype (5.0, the instance's ``dtype_plan``). ``from_config`` applies them only where a module
    creates its tensors in fp32 itself, which depends on the version, so they are applied here.
    """
    if hasattr(model, "_get_dtype_plan"):
        return [k for k, v in model._get_dtype_plan(dtype).items() if v == torch.float32]
    if isinstance(getattr(model, "dtype_plan", None), dict):
        return [k for k, v in model.dtype_plan.items() if v == torch.float32]
    strict = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    loose = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return strict + loose if dtype == torch.float16 else strict if dtype == torch.bfloat16 else []


def _fp32_matcher(model: torch.nn.Module, dtype: torch.dtype):
    """``name -> bool``: whether transformers keeps the tensor named ``name`` in fp32 at ``dtype``
    (a state-dict name matching any pattern, a regular expression searched in the name with ``*``
    for any text: transformers' own matching)."""
    patterns = _fp32_plan(model, dtype) if dtype != torch.float32 else []
    if not patterns:
        return lambda name: False
    match = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return lambda name: match.search(name) is not None


def kept_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Names of the parameters transformers keeps in fp32 when the model runs in ``dtype``
    (DeepSeek-V3's router ``gate.weight`` under bf16); empty for fp32 or a model without the lists.

    Args:
        model (nn.Module): a transformers model (anything else has no such parameters).
        dtype (torch.dtype): the dtype the rest of the model is stored or computed in.
    """
    kept = _fp32_matcher(model, dtype)
    return [n for n, p in model.named_parameters() if p.is_floating_point() and kept(n)]


def keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to fp32 the parameters and buffers transformers keeps in fp32 when loading in ``dtype``
    (a DeepSeek-V3 router's ``gate.weight`` and ``e_score_correction_bias`` under bf16), the same on
    every device, ``meta`` included (see :func:`kept_in_fp32`).

    Args:
        model (nn.Module): a transformers model built at ``dtype``.
        dtype (torch.dtype): the dtype it was built at; fp32 changes nothing.

    Returns:
        nn.Module: ``model``, changed in place.
    """
    kept = _fp32_matcher(model, dtype)
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        skip = module._non_persistent_buffers_set  # not in the state dict: transformers leaves them
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or not t.is_floating_point() or t.dtype == torch.float32 or (
                        store is module._buffers and name in skip):
                    continue
                if kept(prefix + name):
                    # .data keeps the Parameter object (and any reference to it) while its dtype changes
                    t.data = t.data.to(torch.float32)
    return model


# ----- initialisation: the same weights on the host, on meta + shards, at any world size -----

_RNG_INITS = ("normal_", "uniform_", "trunc_normal_")


def _row_seed(base: int, row: int) -> int:
    """A 63-bit seed per row: the parameter's hash mixed with the row index (splitmix64's constant)."""
    return (base ^ ((row + 1) * 0x9E3779B97F4A7C15)) & (2 ** 63 - 1)


def _param_seed(seed: int, name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def _local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, its global offset, the global shape)``: a DTensor's shard (any mesh, any
    ``Shard``/``Replicate`` placements) or a whole tensor at offset 0."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(offset), tuple(tensor.shape)
    return tensor, (0,) * tensor.ndim, tuple(tensor.shape)


@torch.no_grad()
def _draw_rows(tensor: torch.Tensor, base: int, kind: str, kwargs: dict) -> None:
    """Fill ``tensor`` (or its local shard) row by row, each row (the last dimension) from its own
    generator seeded by ``(base, global row index)``: a shard draws only its rows, and a row has the
    same values whatever the layout. 0-D and 1-D tensors are one row. Drawn in fp32, then cast, so a
    bf16 model holds the fp32 model's weights rounded."""
    local, offset, shape = _local_box(tensor)
    if local.numel() == 0:
        return
    width = shape[-1] if shape else 1
    lead_shape, lead_offset = shape[:-1], offset[:-1]
    cols = slice(offset[-1], offset[-1] + local.shape[-1]) if shape else slice(0, 1)
    rows = local.reshape(-1, local.shape[-1] if shape else 1)
    local_lead = local.shape[:-1]
    gen = torch.Generator(device="cpu")
    buf = torch.empty(width, dtype=torch.float32)
    for i in range(rows.shape[0]):
        # global index of local row i: unravel in the local box, shift by the offset, ravel globally
        g, rem = 0, i
        idx = []
        for size in reversed(local_lead):
            idx.append(rem % size)
            rem //= size
        for d, j in enumerate(reversed(idx)):
            g = g * lead_shape[d] + lead_offset[d] + j
        gen.manual_seed(_row_seed(base, g))
        if kind == "normal_":
            buf.normal_(kwargs.get("mean", 0.0), kwargs.get("std", 1.0), generator=gen)
        elif kind == "uniform_":
            buf.uniform_(kwargs.get("a", 0.0), kwargs.get("b", 1.0), generator=gen)
        else:
            torch.nn.init.trunc_normal_(buf, kwargs.get("mean", 0.0), kwargs.get("std", 1.0),
                                        kwargs.get("a", -2.0), kwargs.get("b", 2.0), generator=gen)
        rows[i].copy_(buf[cols])


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Initialise ``model``'s parameters and buffers in place, the same values whatever its layout.

    transformers' own ``_init_weights`` decides what each tensor gets (``normal_(0, initializer_range)``
    for matrices, ones for norms, zeros for biases, the rotary frequencies, ...); only its random
    draws are replaced: every row of a parameter (its last dimension) comes from a generator seeded
    by ``(seed, parameter name, global row index)``. A shard (a DTensor under FSDP2, HSDP or expert
    parallel) therefore draws only its own rows, and the weights equal, to the bit, those of the same
    model built whole on one host, at any world size. This is the only initialisation
    :func:`build_model` and the training entry use, on the host and after sharding on ``meta``.

    Args:
        model (nn.Module): a transformers model, materialised (``to_empty``) but not initialised; its
            parameters may be DTensors. Not wrapped in DDP (names are the model's own).
        seed (int): the run's seed.

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: the model's initialisation draws random values into a tensor that is not one of
            its parameters (a slice or a buffer), which would not be the same across layouts.
    """
    from transformers import initialization as hf_init

    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)

    def seeded(kind):
        def draw(tensor, *args, **kwargs):
            name = names.get(id(tensor))
            if name is None:
                raise ValueError(f"{type(model).__name__}'s initialisation draws {kind} into a tensor of shape "
                                 f"{tuple(tensor.shape)} that is not one of its parameters: init_weights cannot make "
                                 "it independent of the layout; build this model on the host (device='cpu')")
            params = dict(zip(("mean", "std") if kind != "uniform_" else ("a", "b"), args), **kwargs)
            params.pop("generator", None)
            _draw_rows(tensor, _param_seed(seed, name), kind, params)
            return tensor
        return draw

    saved = dict(hf_init.TORCH_INIT_FUNCTIONS)
    hf_init.TORCH_INIT_FUNCTIONS.update({k: seeded(k) for k in _RNG_INITS})
    try:
        for module in model.modules():
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if hasattr(t, "_is_hf_initialized"):
                    del t._is_hf_initialized  # transformers' "loaded, do not touch" flag: everything is new here
            if hasattr(module, "_is_hf_initialized"):
                del module._is_hf_initialized
        init = getattr(model, "_init_weights", None)
        if init is None:
            raise ValueError(f"init_weights needs a transformers model (one with _init_weights); got {type(model).__name__}")
        for module in model.modules():
            init(module)
    finally:
        hf_init.TORCH_INIT_FUNCTIONS.clear()
        hf_init.TORCH_INIT_FUNCTIONS.update(saved)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def materialize(model: torch.nn.Module, device: str | torch.device, seed: int) -> torch.nn.Module:
    """Allocate a model built on ``meta`` (whole, or sharded by FSDP2: then only the local shards)
    on ``device`` and initialise it with :func:`init_weights`.

    Args:
        model (nn.Module): a transformers model on ``meta``, possibly ``fully_shard``-ed.
        device (str | torch.device): where its tensors go.
        seed (int): the run's seed.
    """
    model.to_empty(device=device)
    return init_weights(model, seed)


def enable_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    transformers' activation checkpointing, non-reentrant (``torch.utils.checkpoint``): a layer's
    ``forward`` runs under checkpoint, so a training step keeps only each layer's input (one
    ``[batch, seq, width]`` tensor per layer) and runs every layer's forward once more in backward,
    about a third more compute for activation memory that no longer grows with depth. The module
    hooks stay outside the checkpoint, so FSDP2 gathers a layer's parameters once for its forward
    and once for its backward, as without checkpointing. With deterministic kernels the numbers are
    the same to the last bit (tested on CPU: alone, and resumed runs under FSDP2 and DeepSpeed).

    Args:
        model (nn.Module): a transformers ``*ForCausalLM`` (see :func:`build_model`).

    Returns:
        nn.Module: ``model``, changed in place; generation caching is off (training only).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.activation_checkpointing: {type(model).__name__} has no activation checkpointing "
                         "(transformers models whose decoder layers support it do); set it to false for this model")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model.

    Attributes:
        total (int): all (deduplicated) parameters.
        active (int): parameters used per token: routed experts (weights and biases) count
            ``top_k / num_experts`` of their size, everything else fully (embedding and LM head
            included, as in the Qwen3/DeepSeek/OLMoE reports).
        expert (int): parameters in routed experts.
        embedding (int): input embedding plus untied LM head.
    """

    total: int
    active: int
    expert: int
    embedding: int


def _top_k(model: torch.nn.Module) -> int | None:
    """Experts per token from the model config (``num_experts_per_tok`` and its aliases)."""
    config = getattr(model, "config", None)
    if config is None:
        config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_parameters(model: torch.nn.Module, top_k: int | None = None) -> ParamCount:
    """Total and per-token (activated) parameter counts, from ``classify`` roles and global shapes.

    Args:
        model (nn.Module): any model ``classify`` accepts (meta, DTensor and wrapped models included).
        top_k (int | None): experts per token; read from the model config when ``None``.

    Raises:
        ValueError: the model has routed experts and ``top_k`` is neither given nor in the config.
    """
    infos = classify(model)
    containers = expert_containers(model)
    top_k = top_k or _top_k(model)
    total = active = expert = embedding = 0
    for info in infos:
        numel = math.prod(info.shape)
        total += numel
        if info.role in ("embedding", "lm_head"):
            embedding += numel
        # Everything inside an expert container (GPT-OSS expert biases too) is used by top_k of E experts.
        num_experts = next((e for path, e in containers.items() if not path or info.name.startswith(path + ".")),
                           None)
        if num_experts is None:
            active += numel
            continue
        if top_k is None:
            raise ValueError(f"{info.name} {info.shape} is in a routed expert but top_k is unknown; pass top_k=")
        expert += numel
        active += numel * top_k / num_experts
    return ParamCount(total=total, active=round(active), expert=expert, embedding=embedding)
