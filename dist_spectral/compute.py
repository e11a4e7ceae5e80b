"""Run a whole-matrix rule on the units an owner holds: split into blocks, batch by shape, apply.

Blocks with the same rule key, orientation and shape are stacked into one ``[B, m, n]`` batch, so
a rank that owns 12 experts of one shape runs one batched polar, not 12. Rules with carried state
(:attr:`~dist_spectral.rules.Rule.carried`) get their inputs and state as channels of the same
blocks, ``[B, C, m, n]``, and also batch by step (their math may depend on it: bias corrections,
a basis refreshed every T steps). No communication here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import UnitSpec, read_block, write_block
from .rules import Rule


@dataclass
class MatrixJob:
    """One unit, whole: its ``[rows, n]`` matrix and how to treat it.

    Attributes:
        matrix (Tensor): the unit's rows of the direction input, shape ``[rows, n]``; for a rule
            with carried state ``[C, rows, n]``: its inputs, then its carried state in the rule's
            ``carried`` order.
        spec (UnitSpec): its blocks.
        rule (Rule): the rule to apply.
        group (dict): the param group (hyperparameters).
        axis (str): the permuted axis (``"rows"`` or ``"cols"``).
        transposed (bool): the weight is stored in × out.
        step (int): the parameter's step counter, this step included (default: 0).
        out (Tensor, optional): where to write the result (shape as returned, see
            :func:`run_jobs`), e.g. a view of the caller's output buffer, saving a copy
            (default: None, a new tensor).
    """

    matrix: Tensor
    spec: UnitSpec
    rule: Rule
    group: dict
    axis: str
    transposed: bool
    step: int = 0
    out: Tensor | None = None


def _new_result(job: MatrixJob) -> Tensor:
    if job.rule.stateful:
        return job.matrix.new_empty((1 + len(job.rule.carried),) + job.matrix.shape[-2:])
    return torch.empty_like(job.matrix)


def run_jobs(jobs: list[MatrixJob]) -> tuple[list[Tensor], int]:
    """Directions for every job (same shapes as their matrices; ``[1 + len(carried), rows, n]``
    for rules with carried state: the direction, then the new state) and the polar flops spent."""
    batches: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for j, job in enumerate(jobs):
        stateful = job.rule.stateful
        for k, b in enumerate(job.spec.blocks):
            key = (job.rule.key(job.group), job.axis, job.transposed, b.shape, job.matrix.dtype, b.input_parts)
            batches[key + ((job.step,) if stateful else ())].append((j, k))
    results = [job.out if job.out is not None else _new_result(job) for job in jobs]
    flops = 0
    for key, members in batches.items():
        first, parts = jobs[members[0][0]], key[5]
        rule = first.rule
        stack = torch.stack([read_block(jobs[j].matrix, jobs[j].spec.blocks[k]) for j, k in members])
        if rule.stateful:
            inputs = [stack[:, c] for c in range(rule.inputs)]
            state = {name: stack[:, rule.inputs + c] for c, name in enumerate(rule.carried)}
            out, new_state = rule.direction_with_state(inputs, state, step=first.step, axis=first.axis,
                                                       transposed=first.transposed, group=first.group,
                                                       input_parts=parts)
            channels = torch.stack([out] + [new_state[name] for name in rule.carried], dim=1)
        else:
            channels = rule.direction(stack, axis=first.axis, transposed=first.transposed, group=first.group,
                                      input_parts=parts)
        flops += len(members) * int(rule.polar_flops(*key[3], first.group))
        for (j, k), u in zip(members, channels):
            write_block(results[j], jobs[j].spec.blocks[k], u)
    return results, flops


# ----- compiled batches: what the exchange runs -----
@dataclass(frozen=True)
class ParamContext:
    """How one parameter's blocks are treated in this step (one per parameter, not per unit).

    Attributes:
        rule (Rule): its rule.
        group (dict): its param group (hyperparameters).
        axis (str): the permuted axis (``"rows"`` or ``"cols"``).
        transposed (bool): the weight is stored in × out.
        step (int): its step counter, this step included (default: 0).
    """

    rule: Rule
    group: dict
    axis: str
    transposed: bool
    step: int = 0


@dataclass(frozen=True)
class BlockRef:
    """One block to compute: block ``block`` of a unit whose ``[rows, cols]`` matrix starts at
    element ``offset`` of every channel of the source tensor ``source`` (a ``[C, L]`` tensor)."""

    key: tuple  # the batching key (rule key, axis, transposed, block shape, input parts, ...)
    param: int  # whose context the batch uses
    source: object
    offset: int
    rows: int
    cols: int
    block: Block


@dataclass(frozen=True)
class _Read:
    """``count`` blocks of one source read alike: a strided view ``(offset, unit_stride)`` when
    their offsets are evenly spaced and they have one row run, else gathered by ``index``."""

    source: object
    count: int
    strides: tuple | None  # (storage offset, unit stride, row stride, column stride)
    index: Tensor | None   # flat element offsets, [count * m * k]


@dataclass(frozen=True)
class Batch:
    """Blocks with one key, stacked into ``[B, m, n]``: a fixed handful of tensor operations
    however many blocks (one read and one write per source, one rule call). ``input_parts`` is
    the blocks' :attr:`~dist_spectral.blocks.Block.input_parts` (part of the key)."""

    param: int
    shape: tuple[int, int]
    reads: tuple[_Read, ...]
    size: int
    input_parts: int = 1


def _pattern(rows: int, cols: int, b: Block) -> Tensor:
    """Element offsets of block ``b`` in a ``[rows, cols]`` matrix, ``[m, k]``."""
    return read_block(torch.arange(rows * cols, dtype=torch.int64).view(rows, cols), b)


def compile_batches(refs: list[BlockRef], device: torch.device) -> list[Batch]:
    """Group ``refs`` by key, then by source; evenly spaced blocks of one source become one view
    (the experts of a 3-D tensor, the heads of a projection), the others one gather by an index
    tensor (on ``device``). Built once per plan bucket and rank (and key signature), so a step
    does no per-block Python."""
    by_key: dict[tuple, dict[tuple, list[tuple[int, BlockRef]]]] = defaultdict(lambda: defaultdict(list))
    for r in refs:
        b = r.block
        if b.row_runs == 1:  # a plain block is its first element, a row stride and a column step
            start = r.offset + b.row_start * r.cols + b.col_start
            by_key[r.key][(r.source, r.cols, b.col_step)].append((start, r))
        else:
            by_key[r.key][(r.source, r.rows, r.cols, b)].append((r.offset, r))
    batches = []
    for key, sources in by_key.items():
        reads, first = [], None
        for group, members in sources.items():
            first = members[0][1] if first is None else first
            starts = [s for s, _ in members]
            steps = {q - p for p, q in zip(starts, starts[1:])}
            r = members[0][1]
            if len(group) == 3:
                source, cols, col_step = group
                if len(steps) <= 1:
                    reads.append(_Read(source, len(members), (starts[0], steps.pop() if steps else 1, cols, col_step),
                                       None))
                    continue
                m, k = r.block.shape
                pattern = (torch.arange(m, dtype=torch.int64).view(-1, 1) * cols
                           + torch.arange(k, dtype=torch.int64).view(1, -1) * col_step)
            else:
                source, pattern = group[0], _pattern(r.rows, r.cols, r.block)
            index = (torch.tensor(starts, dtype=torch.int64).view(-1, 1) + pattern.reshape(1, -1)).reshape(-1)
            reads.append(_Read(source, len(members), None, index.to(device)))
        batches.append(Batch(first.param, first.block.shape, tuple(reads), sum(r.count for r in reads),
                             first.block.input_parts))
    return batches


def _view(t: Tensor, read: _Read, shape: tuple[int, int]) -> Tensor:
    off, unit, row, col = read.strides
    return t.as_strided((t.shape[0], read.count) + shape, (t.stride(0), unit, row, col), t.storage_offset() + off)


def read_batch(batch: Batch, sources: dict) -> Tensor:
    """The batch's blocks, ``[C, B, m, k]``, a new contiguous tensor (a rule may work in place on
    it), from ``sources`` (source → ``[C, L]`` tensor)."""
    if len(batch.reads) == 1 and batch.reads[0].index is None:
        return _view(sources[batch.reads[0].source], batch.reads[0], batch.shape).clone(
            memory_format=torch.contiguous_format)
    parts = []
    for r in batch.reads:
        t = sources[r.source]
        parts.append(_view(t, r, batch.shape) if r.index is None
                     else t.index_select(1, r.index).view((t.shape[0], r.count) + batch.shape))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def write_batch(batch: Batch, dests: dict, value: Tensor) -> None:
    """Write ``value`` ``[C, B, m, k]`` into the blocks of ``dests`` (source → ``[C, L]`` tensor)."""
    at = 0
    for r in batch.reads:
        part = value[:, at:at + r.count]
        t = dests[r.source]
        if r.index is None:
            _view(t, r, batch.shape).copy_(part)
        else:
            t.index_copy_(1, r.index, part.reshape(t.shape[0], -1))
        at += r.count


def run_batch(batch: Batch, sources: dict, dests: dict, contexts: dict) -> None:
    """Apply the batch's rule to its blocks read from ``sources``; write results into ``dests``."""
    ctx = contexts[batch.param]
    rule = ctx.rule
    stack = read_batch(batch, sources)
    if rule.stateful:
        stack = stack.transpose(0, 1)  # [B, C, m, k]
        inputs = [stack[:, c] for c in range(rule.inputs)]
        state = {name: stack[:, rule.inputs + c] for c, name in enumerate(rule.carried)}
        out, new_state = rule.direction_with_state(inputs, state, step=ctx.step, axis=ctx.axis,
                                                   transposed=ctx.transposed, group=ctx.group,
                                                   input_parts=batch.input_parts)
        result = torch.stack([out] + [new_state[name] for name in rule.carried], dim=0)
    else:
        result = rule.direction(stack[0], axis=ctx.axis, transposed=ctx.transposed, group=ctx.group,
                                input_parts=batch.input_parts).unsqueeze(0)
    write_batch(batch, dests, result)
