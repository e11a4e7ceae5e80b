"""Checkpoints that reshard: save at W ranks, resume at any W', for plain, DDP, FSDP2 and HSDP models.

Two formats, one API shape (every function is collective over all ranks, and also works on one
process without a process group)::

    save / load                           torch.distributed.checkpoint (DCP) directory: every rank
                                          writes its own shards, reads back whatever shards its new
                                          layout needs
    save_consolidated / load_consolidated one torch.save file written by rank 0 (full tensors on CPU),
                                          loaded into any W by broadcasting from rank 0

What a checkpoint holds, keyed by canonical parameter name (``named_parameters()`` without the
``module.``/``_orig_mod.`` prefixes of DDP and ``torch.compile``), never by position or id::

    model.<fqn>                           parameters and buffers (DTensor shards under FSDP2/HSDP)
    optim.state.<fqn>.<key>               momentum / Adam moments, shaped and sharded like the
                                          parameter, and the scalar ``step`` of each parameter
    optim.param_groups.<i>.*              lr, weight decay, rule and hyperparameters of each group
    dist_spectral                         rank 0's scheduler state, ``extra`` (step counts, RNG,
                                          data position), the optimizer's ``num_steps`` and
                                          ``skipped_steps``, and a manifest ``fqn -> (shape, rule)``

Nothing depends on W or on the owner plan: the plan is rebuilt from the new layouts at the first
step after loading. Every rank saves the same keys because :class:`SpectralOptimizer` creates
state for every parameter at construction (an expert that never received a token has zero
momentum and ``step`` 0), which also means DCP never runs its fake "initialise the state with
zero gradients" step on it.

Loading first compares the checkpoint's names, shapes and rules with the model and optimizer and
raises ``ValueError`` listing every missing, unexpected or mismatched entry before anything is
modified; every rank reaches the same verdict from the same files, so none is left waiting.

Loaded hyperparameters (lr, weight decay, ...) replace the optimizer's, as ``load_state_dict``
does; the optimizer keeps its own ``param_names``.

Saves are atomic: every rank writes into a temporary sibling ``<path>.tmp-<id>``; once all ranks'
files and DCP's ``.metadata`` are written, rank 0 renames it to ``path`` (an older checkpoint there
is moved aside first, then deleted). A process killed during a save leaves only the temporary,
never a partial ``path``; the next save into the same directory deletes such leftovers
(``*.tmp-<id>``, ``*.old-<id>``), so one directory takes one save at a time.

Example (``torchrun``; the same lines on one process)::

    from dist_spectral import checkpoint
    checkpoint.save(f"ckpt/step{step}", model, opt, scheduler, extra={"step": step, "rng": rng_state})
    extra = checkpoint.load("ckpt/step100", model, opt, scheduler)   # at any world size
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import uuid
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from . import faults
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)

FORMAT = "dist_spectral.checkpoint"
VERSION = 1
META_KEY = "dist_spectral"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _dcp(fn, state: dict, path, **kwargs) -> None:
    """``dcp.save``/``dcp.load``; on one process without a process group DCP's no-pg mode, whose
    "assuming the intent is to ... in a single process" warning is the intent here."""
    no_dist = not _distributed()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(state, checkpoint_id=str(path), no_dist=no_dist, **kwargs)


# ----- atomic saves -----
TEMPORARY = re.compile(r".+\.(?:tmp|old)-[0-9a-f]{12}")  # a save's staging directory, or a replaced checkpoint
_saves = 0  # saves started by this process (the fault hook's count)


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer with the fault-test hook after this rank's shard files (see :mod:`dist_spectral.faults`)."""

    def __init__(self, path, save: int):
        super().__init__(path)
        self._save = save

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)  # synchronous: the files are on disk
        faults.kill_point("save", self._save)
        return written


def staging_dir(path: str | os.PathLike) -> Path:
    """The temporary sibling ``<path>.tmp-<id>`` every rank writes a save of ``path`` into (collective:
    rank 0 draws the id and broadcasts it). Rank 0 also deletes what earlier, interrupted saves left
    beside it, and creates the directory (so may the other ranks' writers)."""
    path = Path(path)
    box = [uuid.uuid4().hex[:12]]
    if _distributed():
        dist.broadcast_object_list(box, src=0)
    staging = path.with_name(f"{path.name}.tmp-{box[0]}")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.iterdir():
            if TEMPORARY.fullmatch(stale.name) and stale != staging:
                shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(exist_ok=True)
    return staging


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, path: str | os.PathLike) -> None:
    """Rename a complete ``staging`` directory to ``path`` (rank 0, once every rank's files are written).

    An existing ``path`` is renamed to ``<path>.old-<id>`` first and deleted after, so at every
    instant ``path`` is either the old complete checkpoint, absent, or the new complete one."""
    path = Path(path)
    for sub in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)  # DCP fsyncs its files; the directory entries too, before the name appears
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{staging.name.rsplit('-', 1)[1]}")
        os.replace(path, old)
    os.replace(staging, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _published(staging: Path, path) -> None:
    """After a collective save into ``staging``: rank 0 publishes it; its error, if any, is raised on every rank."""
    error = None
    if _rank() == 0:
        try:
            publish(staging, path)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    if _distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(f"checkpoint written to {staging} but not renamed to {path}: {error}")


def _groups_without_names(osd: dict) -> dict:
    """Drop ``param_names`` (wrapper-dependent, e.g. DDP's ``module.``): the canonical ``params`` are the keys,
    and ``load_state_dict`` keeps the optimizer's own names when the loaded group has none."""
    for g in osd.get("param_groups", []):
        g.pop("param_names", None)
    return osd


def manifest(optimizer: torch.optim.Optimizer, osd: dict) -> dict[str, tuple]:
    """``canonical fqn -> (global shape, rule)`` of every optimized parameter (the same on every rank)."""
    out = {}
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
        for p, fqn in zip(group["params"], saved["params"]):
            out[fqn] = (tuple(p.shape), group.get("rule"))
    return out


def _shapes(msd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in msd.items() if isinstance(v, torch.Tensor)}


def _meta(msd, optimizer, osd, scheduler, extra, world_size: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "world_size": world_size,
            "manifest": manifest(optimizer, osd), "model_shapes": _shapes(msd),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra,
            "num_steps": getattr(optimizer, "num_steps", None),
            "skipped_steps": getattr(optimizer, "skipped_steps", None)}


def _restore_meta(meta: dict, optimizer, scheduler) -> dict:
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    for key in ("num_steps", "skipped_steps"):
        if meta.get(key) is not None and hasattr(optimizer, key):
            setattr(optimizer, key, meta[key])
    return meta["extra"]


def mismatches(saved: dict, current: dict, what: str) -> list[str]:
    """Lines describing keys missing from / unexpected in the checkpoint, and differing values."""
    lines = []
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing:
        lines.append(f"{what} missing from the checkpoint: {', '.join(missing)}")
    if unexpected:
        lines.append(f"{what} in the checkpoint but not in this run: {', '.join(unexpected)}")
    for k in sorted(set(saved) & set(current)):
        if saved[k] != current[k]:
            lines.append(f"{what} {k}: checkpoint {saved[k]} vs this run {current[k]}")
    return lines


def _check(meta: dict, model_shapes: dict, params: dict, path, scheduler) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dist_spectral checkpoint (format {meta.get('format')!r})")
    lines = mismatches(meta["model_shapes"], model_shapes, "model tensor (shape)")
    lines += mismatches(meta["manifest"], params, "optimized parameter (shape, rule)")
    if scheduler is not None and meta["scheduler"] is None:
        lines.append("no scheduler state in the checkpoint: load with scheduler=None")
    if lines:
        raise ValueError(f"checkpoint {path} does not match this model/optimizer; nothing was loaded:\n  "
                         + "\n  ".join(lines)
                         + "\nBuild the model and optimizer (recipe) the checkpoint was saved with")


# ----- DCP: sharded, reshards on load -----
def save(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
         extra: dict | None = None) -> None:
    """Save model, optimizer, scheduler and ``extra`` with ``torch.distributed.checkpoint`` (collective).

    Args:
        path: checkpoint directory (shared by all ranks; created).
        model (nn.Module): plain, DDP, FSDP2 or HSDP model.
        optimizer (torch.optim.Optimizer): its optimizer (normally a :class:`SpectralOptimizer`).
        scheduler: an LR scheduler whose ``state_dict`` is saved (default: none).
        extra (dict | None): anything picklable (step, RNG state, data position); rank 0's value
            is saved and every rank gets it back from :func:`load` (default: ``None``).
    """
    global _saves
    _saves += 1
    state = _checkpoint_state(model, optimizer, scheduler, extra)
    staging = staging_dir(path)
    _dcp(dcp.save, state, staging, storage_writer=_Writer(staging, _saves))
    _published(staging, path)  # dcp.save returned on rank 0: every rank's files and .metadata are written


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, extra: dict | None) -> dict:
    """What :func:`save` and :func:`async_save` write: model and optimizer state keyed by name,
    and on rank 0 the metadata (scheduler, ``extra``, world size)."""
    msd, osd = get_state_dict(model, optimizer)
    osd = _groups_without_names(osd)
    state = {"model": msd, "optim": osd}
    if _rank() == 0:
        world = dist.get_world_size() if _distributed() else 1
        state[META_KEY] = pickle.dumps(_meta(msd, optimizer, osd, scheduler, extra, world))
    return state


def async_save(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
               extra: dict | None = None, process_group=None, when_complete=None):
    """:func:`save` in the background (``torch.distributed.checkpoint.async_save``, collective).

    The state is copied to CPU memory before this returns, so training may change the model and
    optimizer at once; the files are written by a thread into ``<path>.tmp-<id>``, which rank 0
    renames to ``path`` when all are written. The checkpoint is at ``path``, complete, once rank 0's
    future has resolved; wait for the future on every rank before saving again (one save in a
    directory at a time) and before exiting.

    Args:
        path, model, optimizer, scheduler, extra: as in :func:`save`.
        process_group (ProcessGroup | None): the group of the writer's collectives (planning, the
            final metadata). They run on the writer thread, so under training they need a group of
            their own (``dist.new_group(backend="gloo")``), or they would interleave with the
            training's collectives on the default group (default: ``None``, the default group).
        when_complete (callable | None): called without arguments on rank 0, on the writer thread, once
            the checkpoint is at ``path`` and before rank 0's future resolves, e.g. to point a
            ``latest`` file at it (default: ``None``).

    Returns:
        concurrent.futures.Future: resolves when this rank's part is written (rank 0's: once the
        metadata is written and the checkpoint renamed to ``path``).
    """
    global _saves
    _saves += 1
    state = _checkpoint_state(model, optimizer, scheduler, extra)
    staging = staging_dir(path)
    no_dist = not _distributed()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        out = dcp.async_save(state, checkpoint_id=str(staging), storage_writer=_Writer(staging, _saves),
                             process_group=None if no_dist else process_group, no_dist=no_dist)
    if hasattr(out, "upload_completion"):  # a stager that stages in the background: wait for the copy only
        out.staging_completion.result()
        out = out.upload_completion
    if _rank() != 0:
        return out
    # Rank 0's write ends with DCP's gather of every rank's results, then .metadata: all files are there.
    done: Future = Future()

    def finish(written: Future) -> None:
        try:
            written.result()
            publish(staging, path)
            if when_complete is not None:
                when_complete()
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            done.set_exception(e)
        else:
            done.set_result(None)

    out.add_done_callback(finish)
    return done


def read_meta(path: str | os.PathLike) -> dict:
    """The ``dist_spectral`` entry of a DCP checkpoint (manifest, scheduler, extra, counters)."""
    reader = dcp.FileSystemReader(str(path))
    if META_KEY not in reader.read_metadata().state_dict_metadata:
        raise ValueError(f"{path} is not a dist_spectral checkpoint (no {META_KEY!r} entry)")
    holder = {META_KEY: b""}
    _dcp(dcp.load, holder, path)
    return pickle.loads(holder[META_KEY])


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> dict:
    """Load a :func:`save` checkpoint into ``model``/``optimizer``/``scheduler`` at any world size (collective).

    Raises ``ValueError`` listing missing, unexpected and mismatched parameters (names, shapes,
    rules) before anything is modified. Returns the saved ``extra``.
    """
    if TEMPORARY.fullmatch(Path(path).name):
        raise ValueError(f"{path} is the staging directory of a save that never finished (or a replaced "
                         "checkpoint): load the complete checkpoint it was written for, or an earlier one")
    if not Path(path, ".metadata").exists():
        raise FileNotFoundError(f"no DCP checkpoint at {path} (missing {Path(path, '.metadata')})")
    meta = read_meta(path)
    msd, osd = get_state_dict(model, optimizer)
    osd = _groups_without_names(osd)
    _check(meta, _shapes(msd), manifest(optimizer, osd), path, scheduler)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    lines = mismatches({k: None for k in saved if k.startswith("optim.state.")},
                       {f"optim.state.{fqn}.{k}": None for fqn, st in osd["state"].items() for k in st},
                       "optimizer state")
    if lines:
        raise ValueError(f"checkpoint {path} holds different optimizer state; nothing was loaded:\n  "
                         + "\n  ".join(lines))
    state = {"model": msd, "optim": osd}
    _dcp(dcp.load, state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return _restore_meta(meta, optimizer, scheduler)


# ----- one consolidated file -----
def save_consolidated(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                      extra: dict | None = None) -> None:
    """Gather full (unsharded) model and optimizer state to rank 0 and write one ``torch.save`` file (collective).

    Arguments as in :func:`save`; ``path`` is a file. Needs the whole model and optimizer state in
    rank 0's CPU memory. Rank 0's write error, if any, is raised on every rank.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    error = None
    if _rank() == 0:
        world = dist.get_world_size() if _distributed() else 1
        try:
            osd = _groups_without_names(osd)
            meta = _meta(msd, optimizer, osd, scheduler, extra, world)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{path}.tmp")
            torch.save({"model": msd, "optim": osd, META_KEY: meta}, tmp)
            os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint at ``path``
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
    if _distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(f"save_consolidated({path}) failed on rank 0: {error}")


def load_consolidated(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler=None) -> dict:
    """Load a :func:`save_consolidated` file into any world size (collective): rank 0 reads it and
    broadcasts. Raises ``ValueError`` on every rank, before modifying anything, when names, shapes
    or rules differ. Returns the saved ``extra``. Only load files you trust (``torch.load`` unpickles)."""
    full, meta, error = {}, None, None
    # Every rank computes the current names and shapes (the same everywhere) for the comparison.
    msd_now, osd_now = get_state_dict(model, optimizer)
    current = (_shapes(msd_now), manifest(optimizer, _groups_without_names(osd_now)))
    del msd_now, osd_now
    if _rank() == 0:
        try:
            full = torch.load(path, map_location="cpu", weights_only=False)
            meta = full.get(META_KEY, {}) if isinstance(full, dict) else {}
            _check(meta, *current, path, scheduler)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
    if _distributed():
        box = [error, meta]
        dist.broadcast_object_list(box, src=0)
        error, meta = box
    if error is not None:
        raise error
    if _distributed():
        # Separately: set_state_dict skips the model on ranks whose (empty) model dict says "optimizer only".
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, full.get("optim", {}), options=options)
        set_model_state_dict(model, full.get("model", {}), options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=full["model"], optim_state_dict=full["optim"],
                       options=StateDictOptions(full_state_dict=True))
    return _restore_meta(meta, optimizer, scheduler)


__all__ = ["save", "async_save", "load", "staging_dir", "publish", "save_consolidated", "load_consolidated",
           "read_meta", "manifest"]
