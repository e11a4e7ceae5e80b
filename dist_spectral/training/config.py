"""Run configuration: dataclasses, YAML composition and ``key.sub=value`` overrides.

A run config (``configs/runs/*.yaml`` in the repository; the built-in default ships in the package,
``dist_spectral/configs/runs``) has five sections and two top-level keys::

    name: tiny-olmoe-fsdp       # output goes to runs/<name>/ unless out_dir is set
    base: other-run             # optional: start from another run config, then change keys
    model:    {preset: tiny-olmoe, config: {...}}          # dist_spectral/configs/models/<preset>.yaml
    optim:    {recipe: symmetric, overrides: {...}, ...}   # dist_spectral/configs/recipes/<recipe>.yaml
    parallel: fsdp                                          # dist_spectral/configs/parallel/fsdp.yaml, or a mapping
    data:     {source: builtin, seq_len: 64, ...}
    train:    {steps: 300, eval_every: 25, ...}

Overrides on the command line are ``key.sub=value`` with the value parsed as YAML
(``train.steps=50``, ``optim.overrides.router.rule=centered_row_norm``, ``parallel=ddp``). A
section given a string is loaded by name: ``parallel=hsdp`` reads ``dist_spectral/configs/parallel/hsdp.yaml``
and ``model=tiny-qwen3`` picks that preset. A key that no section has is an error naming it and
listing the valid keys at that level; only the free-form mappings (``model.config``,
``optim.overrides``) accept any key, and those are checked by the model and recipe loaders.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..recipes import configs_dir

ENGINES = ("none", "ddp", "fsdp", "hsdp", "ep", "deepspeed")
SOURCES = ("builtin", "memmap", "text", "datasets")
_SECTIONS = ("model", "optim", "parallel", "data", "train")
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class ModelConfig:
    """Attributes:
        preset (str): name in ``dist_spectral/configs/models`` or a YAML path (default: ``tiny-olmoe``).
        dtype (str): parameter dtype (default: ``float32``).
        config (dict): fields replacing the preset's transformers config, e.g. ``{num_hidden_layers: 2}``.
        activation_checkpointing (bool): recompute each decoder layer in backward instead of storing
            its activations: memory for long sequences and deep models, about a third more compute,
            the same numbers (:func:`dist_spectral.models.enable_activation_checkpointing`) (default: false).
    """

    preset: str = "tiny-olmoe"
    dtype: str = "float32"
    config: dict = field(default_factory=dict)
    activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    """Attributes:
        recipe (str): name in ``dist_spectral/configs/recipes`` or a YAML path (default: ``symmetric``).
        overrides (dict): ``build_optimizer`` overrides, e.g. ``{router: {rule: centered_row_norm}}``.
        nonfinite (str): ``skip`` or ``raise`` on a non-finite gradient, or ``off`` (no check, no host
            synchronisation) (default: ``skip``).
        bucket_mb (float): exchange bucket bound in MiB (default: 256).
        comm_dtype (str | None): dtype of exchanged matrices, e.g. ``bfloat16`` (default: fp32).
        replicate_below (int | None): units of rules without polar iterations (routers) with fewer
            elements are computed on every rank holding part of them; 0 = never (default: the
            optimizer's, :data:`dist_spectral.optimizer.REPLICATE_BELOW`).
        clip_grad (float | None): clip the global gradient norm to this value (default: off).
        warmup (int): ``paper_schedule`` warmup steps of vector groups (default: 100).
        constant_fraction (float): fraction of steps at constant lr for matrix groups (default: 0.6).
    """

    recipe: str = "symmetric"
    overrides: dict = field(default_factory=dict)
    nonfinite: str = "skip"
    bucket_mb: float = 256.0
    comm_dtype: typing.Optional[str] = None
    replicate_below: typing.Optional[int] = None
    clip_grad: typing.Optional[float] = None
    warmup: int = 100
    constant_fraction: float = 0.6


@dataclass
class DeepSpeedConfig:
    """``parallel.deepspeed`` (engine ``deepspeed``); a string is shorthand for ``{config: <string>}``.

    The DeepSpeed config is the JSON file ``config`` names, then the fields below that are not
    null, then ``overrides`` (deep-merged); batch sizes come from ``data`` (see
    ``training/launchers.py``).

    Attributes:
        config (str | None): a name in ``dist_spectral/configs/deepspeed`` (``zero2``) or a JSON path (default: none).
        stage (int | None): ZeRO stage 1, 2 or 3 (default: the file's, else 2).
        bf16 (bool | None): bf16 compute with fp32 master weights in the optimizer (default: the
            file's, else off; slow on CPUs without AVX-512-BF16).
        gradient_accumulation_steps (int | None): micro-batches per optimizer step; ``data.batch_size``
            is split into this many (default: the file's, else 1).
        gradient_clipping (float | None): DeepSpeed's global-norm clip; 0 is off (default:
            ``optim.clip_grad``, else the file's, else 0).
        overrides (dict): more DeepSpeed config keys, e.g. ``{zero_optimization: {sub_group_size: 1e6}}``.
    """

    config: typing.Optional[str] = None
    stage: typing.Optional[int] = None
    bf16: typing.Optional[bool] = None
    gradient_accumulation_steps: typing.Optional[int] = None
    gradient_clipping: typing.Optional[float] = None
    overrides: dict = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """Attributes:
        engine (str): ``none`` (one process), ``ddp``, ``fsdp`` (FSDP2), ``hsdp``, ``ep`` or ``deepspeed``
            (ZeRO; see :class:`DeepSpeedConfig`) (default: ``fsdp``).
        replicas (int): HSDP replica groups; the shard dimension is world / replicas (default: 1).
        backend (str): ``auto`` (gloo on CPU, nccl on CUDA), ``gloo`` or ``nccl`` (default: ``auto``).
        device (str): ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (default: ``auto``).
        threads (int): CPU threads per rank; 0 = cores // local ranks, at least 1 (default: 0).
        reshard_after_forward (bool): FSDP2 frees gathered parameters after forward (default: true).
        mixed_precision (str | None): FSDP2 compute dtype, e.g. ``bfloat16`` (parameters, optimizer
            state and gradient reduction stay fp32); ``null`` computes in the parameter dtype.
        expert_dispatch (str): engine ``ep`` only: ``all_gather`` (FSDP2 gathers the experts, every rank
            computes its own tokens' experts) or ``all_to_all`` (tokens travel to the rank holding their
            expert and back: see ``training/expert_parallel.py``) (default: ``all_gather``).
        deepspeed (DeepSpeedConfig): engine ``deepspeed`` only.
    """

    engine: str = "fsdp"
    replicas: int = 1
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0
    reshard_after_forward: bool = True
    mixed_precision: typing.Optional[str] = None
    expert_dispatch: str = "all_gather"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class DataConfig:
    """Attributes:
        source (str): ``builtin`` (the Python standard library's source, bytes), ``memmap``
            (pre-tokenised ``.bin``), ``text`` (local text files) or ``datasets`` (a local
            ``save_to_disk`` directory) (default: ``builtin``).
        path (str | None): file or directory of the data (not for ``builtin``).
        val_path (str | None): separate validation data; without it the last ``val_fraction``
            of the tokens is held out.
        tokenizer (str): ``bytes`` (byte-level, vocab 256) or a local AutoTokenizer directory.
        dtype (str): token dtype of ``.bin`` files, ``uint16`` or ``uint32`` (default: ``uint16``).
        text_field (str): column of a ``datasets`` dataset holding the text (default: ``text``).
        suffixes (str): comma-separated file suffixes read from a ``text`` directory.
        max_bytes (int): cap on the built-in corpus in bytes (default: 4 MB).
        val_fraction (float): share of tokens held out for validation (default: 0.05).
        seq_len (int): tokens per sequence (default: 128).
        batch_size (int): sequences per rank per step (default: 8).
    """

    source: str = "builtin"
    path: typing.Optional[str] = None
    val_path: typing.Optional[str] = None
    tokenizer: str = "bytes"
    dtype: str = "uint16"
    text_field: str = "text"
    suffixes: str = ".txt,.md,.rst,.py"
    max_bytes: int = 4_000_000
    val_fraction: float = 0.05
    seq_len: int = 128
    batch_size: int = 8


@dataclass
class TrainConfig:
    """Attributes:
        steps (int): optimizer steps (default: 300).
        seed (int): model init and data order (default: 0).
        eval_every (int): steps between validation passes; also at step 0 and at the end (default: 50).
        eval_batches (int): batches per rank in one validation pass (default: 4).
        ckpt_every (int): steps between checkpoints; 0 = only at the end if ``ckpt_final`` (default: 0).
        ckpt_final (bool): save a checkpoint after the last step (default: false).
        ckpt_async (bool): write checkpoints in the background (DCP ``async_save``): training goes on
            once the state is copied to CPU memory; ``checkpoints/latest`` names a checkpoint only once
            it is complete (not under DeepSpeed) (default: false).
        ckpt_keep (int): keep the newest ``ckpt_keep`` complete checkpoints, deleting older ones once
            a newer one is complete; 0 keeps all (default: 0).
        progress (bool): tqdm progress bar on rank 0 (default: true).
        plot (bool): write ``loss.png`` at the end (default: true).
    """

    steps: int = 300
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 0
    ckpt_final: bool = False
    ckpt_async: bool = False
    ckpt_keep: int = 0
    progress: bool = True
    plot: bool = True


@dataclass
class RunConfig:
    """A whole run; see the module docstring. ``out_dir`` defaults to ``runs/<name>``."""

    name: str = "run"
    out_dir: typing.Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def output(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----- files -----

def runs_dir() -> Path:
    """``configs/runs`` of the repository (or ``$DIST_SPECTRAL_CONFIG_DIR/runs``), where run names are
    looked up first. These run configs are examples of jobs, not part of the package: a wheel install
    reads them by path."""
    from ..models import CONFIG_DIR_ENV

    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) / "runs" if env else Path(__file__).resolve().parents[2] / "configs" / "runs"


def builtin_runs_dir() -> Path:
    """``dist_spectral/configs/runs``: the run configs that ship in the package (the built-in default,
    :data:`dist_spectral.training.DEFAULT_RUN`), looked up after :func:`runs_dir`, so a wheel install
    runs its default and the repository's run configs name it as their ``base``."""
    return Path(__file__).resolve().parents[1] / "configs" / "runs"


def run_names() -> list[str]:
    """Names of the run configs found by name: :func:`runs_dir`'s, then the package's, sorted."""
    return sorted({p.stem for where in (runs_dir(), builtin_runs_dir()) for p in where.glob("*.yaml")})


def _named_file(kind: str, name: str, near: Path | None = None) -> Path:
    """``<name>.yaml`` in ``near`` (the directory of the run file naming it as its ``base``) or in the
    directories of ``kind`` (runs: :func:`runs_dir`, then :func:`builtin_runs_dir`; layouts:
    ``configs_dir() / kind``, inside the package), or ``name`` itself when it is a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{kind} config file {name!r} does not exist")
        return path
    dirs = [runs_dir(), builtin_runs_dir()] if kind == "runs" else [configs_dir() / kind]
    if near is not None:
        dirs.insert(0, near)
    for where in dirs:
        if (where / f"{name}.yaml").is_file():
            return where / f"{name}.yaml"
    known = run_names() if kind == "runs" else sorted(p.stem for p in dirs[-1].glob("*.yaml"))
    hint = " or a YAML path (the repository's configs/runs/<name>.yaml)" if kind == "runs" else ""
    close = difflib.get_close_matches(name, known, n=1)
    tried = ", ".join(str(where) for where in dict.fromkeys(dirs))
    raise ConfigError(f"unknown {kind} config {name!r}{f' (did you mean {close[0]!r}?)' if close else ''} "
                      f"(no {name}.yaml in {tried}); available: {', '.join(known) or 'none'}{hint}")


def _read_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _expand_section(key: str, value):
    """A section given as a string: a parallel layout name/path, or a model preset name."""
    if key == "deepspeed" and isinstance(value, str):
        return {"config": value}  # parallel.deepspeed=zero2: the DeepSpeed JSON of that name
    if not isinstance(value, str) or key not in _SECTIONS:
        return value
    if key == "parallel":
        return _read_yaml(_named_file("parallel", value))
    if key == "model":
        return {"preset": value}
    if key == "optim":
        return {"recipe": value}
    raise ConfigError(f"section {key!r} must be a mapping, got the string {value!r}")


def _raw_run(name_or_path: str, seen: tuple = ()) -> dict:
    """A run file as a dict with ``base`` and named sections resolved (base first, then this file)."""
    path = _named_file("runs", name_or_path, seen[-1].parent if seen else None)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops ({' -> '.join(map(str, seen))})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    out = _raw_run(base, seen + (path.resolve(),)) if base else {}
    for key, value in data.items():
        # A named section (``parallel: ddp``) replaces the base's; a mapping changes it key by key.
        named = isinstance(value, str) and key in _SECTIONS
        value = _expand_section(key, value)
        if not named and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# ----- typed construction -----

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, hint, where: str):
    """Check ``value`` against a field's type (ints widen to floats; ``Optional`` takes None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a preset called 1b would arrive as a number
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(hints)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, _expand_section(key, value), path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def set_key(cfg: RunConfig, key: str, value) -> None:
    """Set ``cfg.<key>`` (dotted) to ``value``, checking the key and the value's type."""
    parts = key.split(".")
    obj, where = cfg, ""
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        path = f"{where}.{part}" if where else part
        if part not in hints:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(hints)}")
        hint = hints[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(hint):
            if last:
                setattr(obj, part, _build(hint, _expand_section(part, value), path))
                return
            obj, where = getattr(obj, part), path
            continue
        if hint is dict and not last:
            # Free-form mapping: the rest of the key is nested dict keys.
            target = getattr(obj, part)
            for sub in parts[i + 1:-1]:
                target = target.setdefault(sub, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{key}: {sub!r} holds a value, not a mapping")
            target[parts[-1]] = value
            return
        if not last:
            raise ConfigError(f"{path!r} is a value, not a section: write {path}=VALUE")
        setattr(obj, part, _coerce(value, hint, path))
        return


def parse_override(item: str) -> tuple[str, object]:
    """``"train.steps=50"`` → ``("train.steps", 50)`` (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: write key.sub=value, e.g. train.steps=50")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    value = yaml.safe_load(raw) if raw else None
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return key.strip(), value


def load_config(run: str | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """A run config by name (``configs/runs/<run>.yaml``, then the package's built-in runs) or path,
    with ``key=value`` overrides applied.

    Args:
        run (str | None): run name or YAML path; ``None`` gives the defaults of :class:`RunConfig`.
        overrides: ``key.sub=value`` strings, applied in order.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones), a bad value, a missing file.
    """
    cfg = _build(RunConfig, _raw_run(run), "") if run else RunConfig()
    for item in overrides:
        set_key(cfg, *parse_override(item))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks that need no processes (world-size checks happen in :mod:`.launchers`)."""
    checks = [
        (cfg.parallel.engine in ENGINES, f"parallel.engine={cfg.parallel.engine!r}: use one of {', '.join(ENGINES)}"),
        (cfg.data.source in SOURCES, f"data.source={cfg.data.source!r}: use one of {', '.join(SOURCES)}"),
        (cfg.parallel.backend in ("auto", "gloo", "nccl"), f"parallel.backend={cfg.parallel.backend!r}: use auto, gloo or nccl"),
        (cfg.parallel.device in ("auto", "cpu", "cuda"), f"parallel.device={cfg.parallel.device!r}: use auto, cpu or cuda"),
        (cfg.parallel.replicas >= 1, f"parallel.replicas={cfg.parallel.replicas}: must be >= 1"),
        (cfg.parallel.expert_dispatch in ("all_gather", "all_to_all"),
         f"parallel.expert_dispatch={cfg.parallel.expert_dispatch!r}: use all_gather or all_to_all"),
        (cfg.parallel.expert_dispatch == "all_gather" or cfg.parallel.engine == "ep",
         f"parallel.expert_dispatch=all_to_all routes tokens to experts under parallel.engine=ep, "
         f"not {cfg.parallel.engine!r}: use parallel=ep"),
        (cfg.data.dtype in ("uint16", "uint32"), f"data.dtype={cfg.data.dtype!r}: use uint16 or uint32"),
        (0 <= cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction}: must be in [0, 1)"),
        (cfg.data.seq_len >= 2, f"data.seq_len={cfg.data.seq_len}: needs at least 2 tokens"),
        (cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size}: must be >= 1"),
        (cfg.train.steps >= 1, f"train.steps={cfg.train.steps}: must be >= 1"),
        (cfg.train.eval_every >= 0 and cfg.train.ckpt_every >= 0, "train.eval_every and train.ckpt_every must be >= 0"),
        (cfg.train.ckpt_keep >= 0, f"train.ckpt_keep={cfg.train.ckpt_keep}: must be >= 0 (0 keeps every checkpoint)"),
        (not (cfg.train.ckpt_async and cfg.parallel.engine == "deepspeed"),
         "train.ckpt_async: DeepSpeed writes its own checkpoints synchronously; set train.ckpt_async=false"),
        (cfg.optim.nonfinite in ("skip", "raise", "off"),
         f"optim.nonfinite={cfg.optim.nonfinite!r}: use skip, raise or off"),
        (cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0, f"optim.clip_grad={cfg.optim.clip_grad}: must be > 0 or null"),
        (cfg.parallel.deepspeed.stage in (None, 1, 2, 3), f"parallel.deepspeed.stage={cfg.parallel.deepspeed.stage}: "
                                                           "use 1, 2 or 3"),
        ((cfg.parallel.deepspeed.gradient_accumulation_steps or 1) >= 1,
         "parallel.deepspeed.gradient_accumulation_steps must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["RunConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "DeepSpeedConfig", "DataConfig", "TrainConfig",
           "ConfigError", "load_config", "set_key", "parse_override", "validate", "dump", "ENGINES"]
