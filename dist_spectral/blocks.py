"""How a parameter splits into the matrices a whole-matrix rule acts on.

A parameter of shape ``[..., n]`` is seen as its 2-D view ``[R, n]`` with ``R = prod(shape[:-1])``
(the layout every engine stores rows in). A *unit* is a contiguous row range of that view that must
be whole on one rank; inside it, *blocks* are the separate matrices a rule is applied to::

    attention.q  [H·hd, d]  per head   -> H units of hd rows, one block each
    attention.o  [d, H·hd]  per head   -> 1 unit (all rows), H column blocks of width hd
    attention.qkv  stacked [q; k; v]    -> per head: one unit per hd rows (each one head's q, k or v);
                                           otherwise 3 units: q rows, k rows, v rows
    attention.qkv  grouped [G, q/G + 2, hd] (per kv head g: its query heads, its key, its value; GPT-NeoX
                   is G = H) -> per head as stacked; otherwise 1 unit, blocks q, k, v of G row runs each
    expert.gate_up [E, 2r, d] halves   -> 2E units (gate rows, up rows of each expert)
    expert.gate_up [E, d, 2r] interleaved -> E units of d rows, blocks = columns ::2 and 1::2
    anything else  [..., m, n]         -> one unit per leading index (one per expert for 3-D)

Units are the granularity of ownership: a unit is gathered to one owner, which runs the rule on its
blocks. Per-head column blocks (``o``) keep the whole matrix as one unit because columns cut every
row; gathering the rows once and splitting on the owner costs the same bytes. They are also the
only blocks that split a matrix's input side: the heads' outputs add, so Muon scales them by the
whole ``o``'s shape (:attr:`Block.input_parts`), and splitting into heads changes the update's
direction, not its size.

The *permuted axis* says which side of a block carries the permutation symmetry (tokens, neurons,
experts): row rules normalise along it, so a column-aware rule is the row rule on the transpose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .roles import ParamInfo


@dataclass(frozen=True)
class Block:
    """One matrix inside a unit: rows ``[row_start, row_stop)`` of the unit, columns ``col_start:col_stop:col_step``.

    With ``row_runs > 1`` its rows are that range repeated every ``row_period`` rows, ``row_runs``
    times, in order (q, k or v of a fused qkv whose rows are grouped per kv head); read and write
    such a block with :func:`read_block` / :func:`write_block`.

    ``input_parts`` counts the equal blocks, this one included, that split one matrix's *input*
    side: the ``H`` head blocks of a per-head attention output. Their outputs add into the same
    features, so a shape scale must see the whole matrix's input width ``input_parts · fan_in``,
    not the block's (see :func:`~dist_spectral.functional.muon_scale`).
    """

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    col_step: int = 1
    row_period: int = 0
    row_runs: int = 1
    input_parts: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        cols = len(range(self.col_start, self.col_stop, self.col_step))
        return ((self.row_stop - self.row_start) * self.row_runs, cols)


def _block_view(matrix: Tensor, b: Block) -> Tensor:
    """``b`` of a unit's ``[..., rows, n]`` matrix as a view: ``[..., m, k]``, or ``[..., runs, m/runs, k]``."""
    cols = slice(b.col_start, b.col_stop, b.col_step)
    if b.row_runs == 1:
        return matrix[..., b.row_start:b.row_stop, cols]
    runs = matrix[..., :b.row_runs * b.row_period, :].unflatten(-2, (b.row_runs, b.row_period))
    return runs[..., b.row_start:b.row_stop, cols]


def read_block(matrix: Tensor, b: Block) -> Tensor:
    """Block ``b`` of a unit's ``[..., rows, n]`` matrix, ``[..., m, k]`` (a view unless it has several row runs)."""
    view = _block_view(matrix, b)
    return view if b.row_runs == 1 else view.flatten(-3, -2)


def write_block(matrix: Tensor, b: Block, value: Tensor) -> None:
    """Write ``value`` (``[..., m, k]``, as :func:`read_block` returns) into block ``b`` of ``matrix``."""
    view = _block_view(matrix, b)
    view.copy_(value if b.row_runs == 1 else value.unflatten(-2, (b.row_runs, b.row_stop - b.row_start)))


@dataclass(frozen=True)
class UnitSpec:
    """A contiguous row range ``[row_start, row_stop)`` of the parameter's 2-D view and its blocks."""

    row_start: int
    row_stop: int
    blocks: tuple[Block, ...]

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def view_2d_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[R, n]`` view every layout and unit refers to (a 1-D tensor is one row)."""
    if len(shape) == 0:
        return (1, 1)
    return (math.prod(shape[:-1]), shape[-1])


def permuted_axis(info: ParamInfo) -> str:
    """``"rows"`` or ``"cols"``: the side of each block with the permutation symmetry.

    Down projections hold neurons on their input side (columns in ``nn.Linear``'s out × in);
    ``transposed`` weights (``x @ W``, GPT-OSS experts) swap that.
    """
    if info.role in ("mlp.down", "expert.down"):
        neurons_on_cols = not info.transposed
    elif info.role in ("mlp.gate", "mlp.up", "mlp.gate_up", "expert.gate", "expert.up", "expert.gate_up"):
        neurons_on_cols = info.transposed
    else:
        neurons_on_cols = False
    return "cols" if neurons_on_cols else "rows"


def fan_out_in(info: ParamInfo, block_shape: tuple[int, int]) -> tuple[int, int]:
    """(fan_out, fan_in) of a block, for Muon's shape scale."""
    rows, cols = block_shape
    return (cols, rows) if info.transposed else (rows, cols)


def _full(rows: int, cols: int) -> tuple[Block, ...]:
    return (Block(0, rows, 0, cols),)


def _grouped_qkv(info: ParamInfo, rows: int, cols: int) -> UnitSpec:
    """A fused qkv stored per kv head (``[G, q/G + 2, hd]`` rows) as one unit of three blocks:
    all query rows, all key rows, all value rows, each a run per kv head."""
    q_rows, k_rows, v_rows = info.qkv_split
    hd = info.head_dim
    if not hd or k_rows != v_rows or k_rows % hd or q_rows % (k_rows // hd) or q_rows + k_rows + v_rows != rows:
        raise ValueError(f"{info.name}: grouped qkv layout with split {info.qkv_split} and head_dim={hd} does not "
                         f"describe {rows} rows; expected q, k, v rows with k = v = kv_heads * head_dim")
    groups = k_rows // hd
    q = q_rows // groups
    period = q + 2 * hd
    return UnitSpec(0, rows, tuple(Block(start, stop, 0, cols, 1, period, groups)
                                   for start, stop in ((0, q), (q, q + hd), (q + hd, period))))


def unit_specs(info: ParamInfo, per_head: bool = True, split_gate_up: bool = True) -> tuple[UnitSpec, ...]:
    """Split a parameter into units and blocks (see the module docstring).

    Args:
        info (ParamInfo): the parameter's role and structure.
        per_head (bool): split attention projections into head blocks (default: True).
        split_gate_up (bool): a fused gate/up tensor is two matrices per expert, gate and up
            (default: True); False treats each expert's ``[2r, d]`` as one matrix, as Moonlight's
            and DeepSpeed's Muon do.
    """
    shape = info.shape
    rows, cols = view_2d_shape(shape)
    role = info.role
    if len(shape) < 2:
        return (UnitSpec(0, rows, _full(rows, cols)),)

    head_dim = info.head_dim
    if per_head and head_dim and role in ("attention.q", "attention.k", "attention.v", "attention.qkv"):
        if rows % head_dim:
            raise ValueError(f"{info.name}: {rows} rows are not a multiple of head_dim={head_dim} for per-head polar; "
                             "set per_head: false for this group or fix head_dim")
        return tuple(UnitSpec(h * head_dim, (h + 1) * head_dim, _full(head_dim, cols)) for h in range(rows // head_dim))
    if per_head and head_dim and role == "attention.o":
        if cols % head_dim:
            raise ValueError(f"{info.name}: {cols} columns are not a multiple of head_dim={head_dim} for per-head polar")
        heads = cols // head_dim
        blocks = tuple(Block(0, rows, h * head_dim, (h + 1) * head_dim, input_parts=heads) for h in range(heads))
        return (UnitSpec(0, rows, blocks),)
    if role == "attention.qkv" and info.qkv_split and info.qkv_layout == "grouped":
        return (_grouped_qkv(info, rows, cols),)
    if role == "attention.qkv" and info.qkv_split:
        units, start = [], 0
        for size in info.qkv_split:
            units.append(UnitSpec(start, start + size, _full(size, cols)))
            start += size
        return tuple(units)

    # One matrix per leading index: experts of a 3-D tensor, or the single 2-D matrix.
    m = shape[-2]
    count = rows // m
    units = []
    for e in range(count):
        base = e * m
        if info.fused and not split_gate_up:
            units.append(UnitSpec(base, base + m, _full(m, cols)))
        elif info.fused == "halves" and info.transposed:  # [E, d, 2r] used as x @ W: gate, up on the last axis
            if cols % 2:
                raise ValueError(f"{info.name}: fused gate/up with {cols} columns cannot split into equal halves")
            half = cols // 2
            units.append(UnitSpec(base, base + m, (Block(0, m, 0, half), Block(0, m, half, cols))))
        elif info.fused == "halves":
            if m % 2:
                raise ValueError(f"{info.name}: fused gate/up with {m} rows cannot split into equal halves")
            half = m // 2
            units += [UnitSpec(base, base + half, _full(half, cols)), UnitSpec(base + half, base + m, _full(half, cols))]
        elif info.fused == "interleaved":
            if cols % 2:
                raise ValueError(f"{info.name}: interleaved gate/up with {cols} columns cannot split into gate and up")
            units.append(UnitSpec(base, base + m, (Block(0, m, 0, cols, 2), Block(0, m, 1, cols, 2))))
        else:
            units.append(UnitSpec(base, base + m, _full(m, cols)))
    return tuple(units)


def group_unit_specs(info: ParamInfo, group: dict) -> tuple[UnitSpec, ...]:
    """:func:`unit_specs` with a param group's options ``per_head`` (default: False) and
    ``split_gate_up`` (default: True)."""
    return unit_specs(info, per_head=group.get("per_head", False), split_gate_up=group.get("split_gate_up", True))
