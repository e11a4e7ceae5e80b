"""Execute a :class:`~dist_spectral.plan.Plan` on one rank: gather, compute, scatter back.

Per bucket (``W`` = 3, a matrix sharded by rows, owner rank 1)::

    rank 0 ──rows 0:k──►┐                        ┌──rows 0:k──► rank 0
    rank 1 (owner) ─────┼─► whole matrix ─► rule ┤ (keeps its own rows)
    rank 2 ──rows 2k:──►┘                        └──rows 2k:──► rank 2
         all_to_all_single #1                 all_to_all_single #2

A replicated unit (a small router, see plan.py) has no owner: its pieces ride the same gather to
every rank holding part of it, each of them computes it and keeps its own rows, and it has no
scatter; those ranks compute it after issuing the bucket's scatter, so it overlaps that instead
of delaying it.

Bucket k+1's gather is in flight while bucket k computes, and bucket k's scatter is in flight
while bucket k+1 computes (``async_op=True``; on CUDA the exchange runs on a side stream, see
:class:`_Streams`). Pieces are packed by destination rank in plan
order, so both sides agree on offsets without sending any metadata.

A parameter's local data may have several channels, ``[C, local]``: a rule with carried state
sends its inputs and its state (C = the plan's gather channels) and gets back its direction and
new state (the scatter channels). A piece then travels as its C channel slices back to back.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from datetime import timedelta
import torch
import torch.distributed as dist
from torch import Tensor

from .compute import BlockRef, ParamContext, compile_batches, run_batch
from .plan import Plan, Unit
from .stats import StepStats


class CollectiveError(RuntimeError):
    """A collective of an optimizer step failed or timed out: a rank died, stalled or diverged.

    Every surviving rank raises it within the timeout instead of hanging. Resume all ranks from
    the last checkpoint (:func:`dist_spectral.checkpoint.load`). Under gloo a collective that
    timed out waiting for a stalled (not dead) peer stays open in a worker thread and delays a
    normal interpreter exit until that peer goes away: training scripts should log the error and
    leave with ``os._exit(1)`` so the launcher tears the job down.

    Attributes:
        step (int | None): the optimizer step (1-based count of ``step()`` calls, checkpoints included).
        collective (str): which collective, and of what (bucket, parameter).
    """

    def __init__(self, step: int | None, collective: str, cause: BaseException, timeout: timedelta | None = None):
        self.step, self.collective = step, collective
        limit = f" (timeout {timeout.total_seconds():g} s)" if timeout is not None else ""
        where = f"optimizer step {step}: " if step is not None else ""
        rank = f" on rank {dist.get_rank()}" if dist.is_available() and dist.is_initialized() else ""
        super().__init__(f"{where}{collective} failed{rank}{limit}: {cause}. Another rank probably died, stalled or "
                         "diverged; restart every rank from the last checkpoint")


def wait(work, timeout: timedelta | None) -> None:
    """Wait for an async collective, at most ``timeout`` (default: the process group's timeout)."""
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


class Exchange:
    """This rank's view of a plan: which pieces it sends, receives, owns and computes.

    Args:
        plan (Plan): the shared plan.
        rank (int): this rank in ``group``.
        group: the process group the plan's ranks index (default: the world), or ``None`` on
            one process.
        comm_dtype (torch.dtype | None): dtype on the wire (default: per bucket, the widest dtype of
            its parameters: fp32 where a bf16 model keeps its router in fp32).
        timeout (timedelta | None): longest wait for one collective; past it, or when a peer dies,
            :class:`CollectiveError` names the step, bucket and collective (default: the process
            group's timeout).
    """

    def __init__(self, plan: Plan, rank: int, group=None, comm_dtype: torch.dtype | None = None,
                 timeout: timedelta | None = None):
        self.plan = plan
        self.rank = rank
        self.group = group
        self.comm_dtype = comm_dtype
        self.timeout = timeout
        self.step: int | None = None  # set by the optimizer before run(), for error messages
        self._compiled: tuple | None = None  # (signature, compiled buckets) of the last run

    # ----- helpers -----
    def _owned_parts(self, unit: Unit):
        """This rank's own element ranges of a unit."""
        layout = self.plan.params[unit.param].layout
        for a, b in layout.holdings[self.rank]:
            lo, hi = max(a, unit.start), min(b, unit.stop)
            if hi > lo:
                yield lo, hi

    def _wire_dtype(self, bucket, dtypes: dict[int, torch.dtype]) -> torch.dtype:
        """One bucket's dtype on the wire: ``comm_dtype``, else the widest dtype of its parameters.

        Every rank derives it from the plan and the parameters' dtypes (equal on all ranks: they
        are in the plan's fingerprint), never from what it happens to hold, so all ranks agree with
        no metadata; a bucket mixing bf16 and fp32 parameters (a router kept in fp32) travels in
        fp32, which carries bf16 values exactly."""
        if self.comm_dtype is not None:
            return self.comm_dtype
        wire = None
        for uid in bucket.units:
            dtype = dtypes[self.plan.units[uid].param]
            wire = dtype if wire is None else torch.promote_types(wire, dtype)
        return wire or torch.float32

    def _collective(self, phase: str, bucket_index: int, send: list[Tensor], recv_numel: int, send_sizes, recv_sizes,
                    wire: torch.dtype, device: torch.device, stats: StepStats, replicated=(0, 0)):
        """Start one all_to_all_single in dtype ``wire``; ``replicated`` (elements sent, received) of
        the payload belong to replicated units and are counted as the ``replicate`` phase."""
        # cast piece by piece: no intermediate copy in the widest dtype before a narrower comm_dtype
        payload = (torch.cat([t.to(wire) for t in send]) if send
                   else torch.empty(0, dtype=wire, device=device))
        out = torch.empty(recv_numel, dtype=wire, device=device)
        size = payload.element_size()
        stats.bytes_sent[phase] += (payload.numel() - replicated[0]) * size
        stats.bytes_received[phase] += (out.numel() - replicated[1]) * size
        if replicated != (0, 0):
            stats.bytes_sent["replicate"] += replicated[0] * size
            stats.bytes_received["replicate"] += replicated[1] * size
        stats.collectives += 1
        try:
            work = dist.all_to_all_single(out, payload, recv_sizes, send_sizes, group=self.group, async_op=True)
        except RuntimeError as e:
            raise CollectiveError(self.step, self._what(phase, bucket_index), e, self.timeout) from e
        return work, out

    def _what(self, phase: str, bucket_index: int) -> str:
        return f"all_to_all_single ({phase}) of exchange bucket {bucket_index + 1}/{len(self.plan.buckets)}"

    def _wait(self, work, phase: str, bucket_index: int) -> None:
        try:
            wait(work, self.timeout)
        except RuntimeError as e:
            raise CollectiveError(self.step, self._what(phase, bucket_index), e, self.timeout) from e

    def _needs_collective(self, bucket, phase: str) -> bool:
        pieces = bucket.gather if phase == "gather" else bucket.scatter
        return self.plan.world_size > 1 and len(pieces) > 0

    # ----- this rank's schedule, computed once -----
    @functools.cached_property
    def _views(self) -> list[_BucketView]:
        plan, rank = self.plan, self.rank
        views = []
        for bucket in plan.buckets:
            incoming = {p.uid for p in bucket.gather if p.dst == rank}
            units = [plan.units[u] for u in bucket.units]
            owned = [u for u in units if u.owner == rank]
            replicas = [u for u in units if u.replicated and rank in u.replicas]
            views.append(_BucketView(
                gather_send=sorted((p for p in bucket.gather if p.src == rank), key=lambda p: p.dst),
                gather_recv=sorted((p for p in bucket.gather if p.dst == rank), key=lambda p: p.src),
                gather_sizes=plan.split_sizes(bucket, rank, "gather"),
                scatter_send=sorted((p for p in bucket.scatter if p.src == rank), key=lambda p: p.dst),
                scatter_recv=sorted((p for p in bucket.scatter if p.dst == rank), key=lambda p: p.src),
                scatter_sizes=plan.split_sizes(bucket, rank, "scatter"),
                ready=[u for u in owned if u.uid not in incoming],
                waiting=[u for u in owned if u.uid in incoming],
                replicas_ready=[u for u in replicas if u.uid not in incoming],
                replicas_waiting=[u for u in replicas if u.uid in incoming],
                replicated_recv=sum(p.numel for p in bucket.gather if p.dst == rank and plan.units[p.uid].replicated),
                whole={u.uid for u in owned + replicas if list(self._owned_parts(u)) == [(u.start, u.stop)]},
                gather=self._needs_collective(bucket, "gather"),
                scatter=self._needs_collective(bucket, "scatter"),
            ))
        return views

    # ----- the step -----
    def run(self, inputs: dict[int, Tensor], contexts: dict[int, ParamContext],
            stats: StepStats) -> dict[int, Tensor]:
        """Directions for every whole-matrix parameter, as flat local tensors.

        Per bucket: units whose rows are all on this rank (``ready``) are computed while the
        bucket's gather is in flight; the others once it lands. The work of each bucket is
        compiled once (:meth:`_program`): a step runs a few tensor operations per batch of blocks
        of one (rule key, shape), not per unit.

        Args:
            inputs: plan parameter position → flat local direction input, 1-D, or ``[C, local]``
                with C the parameter's gather channels (its inputs, then its carried state).
            contexts: plan parameter position → its :class:`~dist_spectral.compute.ParamContext`
                (rule, group, axis, step) for this step.
            stats (StepStats): the step's counters; bytes, flops and seconds are added to them.

        Returns:
            position → the direction (1-D where the input was), or ``[C', local]`` with C' the
            scatter channels (the direction, then the new carried state).
        """
        for counts in (stats.bytes_sent, stats.bytes_received):
            for phase in ("gather", "replicate", "scatter"):
                counts.setdefault(phase, 0)
        flat_inputs = {pos for pos, x in inputs.items() if x.dim() == 1}
        inputs = {pos: (x.view(1, -1) if x.dim() == 1 else x).contiguous() for pos, x in inputs.items()}
        for pos, x in inputs.items():
            if x.shape[0] != self.plan.params[pos].channels[0]:
                raise ValueError(f"{self.plan.params[pos].name}: {x.shape[0]} input channels, the plan expects "
                                 f"{self.plan.params[pos].channels[0]}")
        outputs = _Run(self, inputs, contexts, stats).all_buckets()
        return {pos: (o[0] if pos in flat_inputs and o.shape[0] == 1 else o) for pos, o in outputs.items()}

    def _signature(self, inputs: dict[int, Tensor], contexts: dict[int, ParamContext]) -> tuple:
        """What the compiled batches depend on besides the plan: per parameter its rule key, axis,
        orientation and dtype, and for rules batched by step, which of them share a step (not the
        step itself, so a step count does not force a recompile)."""
        first_with_step: dict[int, int] = {}
        keys: dict[int, tuple] = {}  # one rule key per param group, not per parameter
        sig = []
        for pos in sorted(contexts):
            c = contexts[pos]
            same = first_with_step.setdefault(c.step, pos) if c.rule.stateful else None
            key = keys.get(id(c.group))
            if key is None:
                key = keys[id(c.group)] = c.rule.key(c.group)
            sig.append((pos, key, c.axis, c.transposed, inputs[pos].dtype, same))
        device = next(iter(inputs.values())).device if inputs else torch.device("cpu")
        return tuple(sig), device

    def _program(self, inputs: dict[int, Tensor], contexts: dict[int, ParamContext]) -> list[_Program]:
        """This rank's compiled buckets for these inputs' keys and dtypes (cached by signature)."""
        sig = self._signature(inputs, contexts)
        if self._compiled is None or self._compiled[0] != sig:
            keys = {s[0]: s[1:] for s in sig[0]}
            dtypes = {pos: inputs[pos].dtype for pos in inputs}
            self._compiled = (sig, [self._compile(bi, v, keys, dtypes, contexts, sig[1])
                                    for bi, v in enumerate(self._views)])
        return self._compiled[1]

    def _compile(self, bi: int, v: _BucketView, keys: dict, dtypes: dict, contexts: dict[int, ParamContext],
                 device: torch.device) -> _Program:
        plan, rank = self.plan, self.rank
        channels = lambda u, phase: plan.params[u.param].channels[phase]  # noqa: E731
        local_units = v.ready + v.waiting + v.replicas_ready + v.replicas_waiting
        # units not whole here are assembled into one buffer per (dtype, channels in, channels out)
        buffers: dict[tuple, int] = {}
        at: dict[int, tuple] = {}  # uid -> (source, offset)
        own_in, own_out = [], []
        for u in local_units:
            layout = plan.params[u.param].layout
            if u.uid in v.whole:
                at[u.uid] = (("param", u.param), layout.local_offset(rank, u.start))
                continue
            cls = (dtypes[u.param], channels(u, 0), channels(u, 1))
            off = buffers.get(cls, 0)
            buffers[cls] = off + u.stop - u.start
            at[u.uid] = (("buffer", cls), off)
            for a, b in self._owned_parts(u):
                own_in.append((("param", u.param), layout.local_offset(rank, a), ("buffer", cls), off + a - u.start,
                               b - a))
                own_out.append((("buffer", cls), off + a - u.start, ("param", u.param),
                                    layout.local_offset(rank, a), b - a))

        def batches(units):
            refs = []
            for u in units:
                source, off = at[u.uid]
                k = keys[u.param]
                stateful_step = (k[-1],) if k[-1] is not None else ()
                for b in u.spec.blocks:
                    refs.append(BlockRef(k[:-1] + (b.shape, b.input_parts) + stateful_step, u.param, source, off,
                                         u.spec.rows, plan.params[u.param].layout.cols, b))
            compiled = compile_batches(refs, device)
            flops = sum(b.size * int(contexts[b.param].rule.polar_flops(*b.shape, contexts[b.param].group))
                        for b in compiled)
            return _Work(compiled, flops, sum(u.cost for u in units))

        def wire(pieces, phase, where):
            """The pieces in wire order as strided runs (see :func:`_strided_runs`)."""
            out = []
            for p in pieces:
                u = plan.units[p.uid]
                c = channels(u, 0 if phase == "gather" else 1)
                if where == "local":
                    src = (("param", u.param), plan.params[u.param].layout.local_offset(rank, p.start))
                else:  # the unit as this rank holds it for computing
                    source, off = at[p.uid]
                    src = (source, off + p.start - u.start) if source[0] == "buffer" else \
                        (source, plan.params[u.param].layout.local_offset(rank, p.start))
                out.append([src[0], src[1], p.numel, c])
            return _strided_runs(out)

        return _Program(
            buffers=buffers,
            own_in=_merge_copies(own_in), own_out=_merge_copies(own_out),
            ready=batches(v.ready), waiting=batches(v.waiting),
            replicas_ready=batches(v.replicas_ready), replicas_waiting=batches(v.replicas_waiting),
            gather_send=wire(v.gather_send, "gather", "local"),
            gather_recv=wire(v.gather_recv, "gather", "computed"),
            gather_replicated=sum(p.numel * channels(plan.units[p.uid], 0) for p in v.gather_send
                                  if plan.units[p.uid].replicated),
            scatter_send=wire(v.scatter_send, "scatter", "computed"),
            scatter_recv=wire(v.scatter_recv, "scatter", "local"),
            replicated_recv=v.replicated_recv,
            wire=self._wire_dtype(plan.buckets[bi], dtypes),
            gather=v.gather, scatter=v.scatter, gather_sizes=v.gather_sizes, scatter_sizes=v.scatter_sizes,
        )


def _strided_runs(pieces: list[list]) -> list[_Strided]:
    """Pieces ``(source, offset, elements, channels)`` in wire order as strided runs: consecutive
    pieces of one source, of equal size and evenly spaced (a parameter's units held whole, or those
    of its experts an owner computes: every W-th), are one :class:`_Strided`, one view copied at once,
    so packing costs a few operations per parameter, not one per unit. Adjacent pieces are one
    longer piece first."""
    merged: list[list] = []
    for src, off, n, c in pieces:
        last = merged[-1] if merged else None
        if last is not None and c == 1 and last[3] == 1 and last[0] == src and last[1] + last[2] == off:
            last[2] += n
        else:
            merged.append([src, off, n, c])
    runs: list[_Strided] = []
    for src, off, n, c in merged:
        last = runs[-1] if runs else None
        if last is not None and last.source == src and last.numel == n and last.channels == c and (
                (last.count == 1 and off > last.offset) or off == last.offset + last.count * last.step):
            step = off - last.offset if last.count == 1 else last.step
            runs[-1] = _Strided(src, last.offset, n, c, last.count + 1, step)
        else:
            runs.append(_Strided(src, off, n, c, 1, n))
    return runs


@dataclass(frozen=True)
class _Strided:
    """``count`` pieces of ``numel`` elements of every channel of a ``[C, L]`` source, the first at
    ``offset``, each ``step`` elements after the last; on the wire piece by piece, each piece's C
    channel slices back to back."""

    source: object
    offset: int
    numel: int
    channels: int
    count: int
    step: int

    @property
    def wire_numel(self) -> int:
        return self.count * self.channels * self.numel

    def view(self, t: Tensor) -> Tensor:
        """The run's elements of ``t`` as ``[count, C, numel]``, a view."""
        return t.as_strided((self.count, t.shape[0], self.numel), (self.step, t.stride(0), t.stride(1)),
                            t.storage_offset() + self.offset * t.stride(1))


def _merge_copies(copies: list[tuple]) -> list[tuple]:
    """Merge copies adjacent in both their source and destination."""
    out: list[list] = []
    for src, soff, dst, doff, n in copies:
        last = out[-1] if out else None
        if last is not None and last[0] == src and last[2] == dst and last[1] + last[4] == soff \
                and last[3] + last[4] == doff:
            last[4] += n
        else:
            out.append([src, soff, dst, doff, n])
    return [tuple(c) for c in out]


@dataclass
class _Work:
    """A list of units to compute, compiled: its batches, polar flops and estimated cost."""

    batches: list
    polar_flops: int
    cost: int


@dataclass
class _Program:
    """One bucket as this rank runs it, compiled from the plan: buffers, merged copies and wire
    pieces ``(source, offset, elements, channels)``, and the batches of each phase."""

    buffers: dict            # (dtype, channels in, channels out) -> elements of units assembled here
    own_in: list             # (source, offset, buffer, offset, elements): own pieces into the buffers
    own_out: list            # (buffer, offset, param, offset, elements): own rows of buffer results
    ready: _Work
    waiting: _Work
    replicas_ready: _Work
    replicas_waiting: _Work
    gather_send: list        # _Strided: wire pieces, strided runs of them
    gather_recv: list
    gather_replicated: int   # elements of the gather this rank sends for replicated units
    scatter_send: list
    scatter_recv: list
    replicated_recv: int
    wire: torch.dtype
    gather: bool
    scatter: bool
    gather_sizes: tuple
    scatter_sizes: tuple


class _Run:
    """One :meth:`Exchange.run`: the buffers of a step and its named phases, bucket by bucket."""

    def __init__(self, exchange: Exchange, inputs: dict[int, Tensor], contexts: dict[int, ParamContext],
                 stats: StepStats):
        self.ex, self.plan = exchange, exchange.plan
        self.contexts, self.stats = contexts, stats
        self.programs = exchange._program(inputs, contexts)
        # Parameters may differ in dtype (a bf16 model with its router kept in fp32): each unit is
        # assembled and computed in its own parameter's dtype, as it is when whole on one rank, so
        # the result does not depend on the number of ranks; only the wire is per bucket.
        self.outputs = {pos: x.new_empty(self.plan.params[pos].channels[1], x.shape[1]) for pos, x in inputs.items()}
        self.ins = {("param", pos): x for pos, x in inputs.items()}
        self.outs = {("param", pos): x for pos, x in self.outputs.items()}
        first = next(iter(inputs.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.streams = _Streams(self.device)

    def all_buckets(self) -> dict[int, Tensor]:
        """Run every bucket, overlapping bucket k+1's gather and bucket k's scatter with compute."""
        stats, clock = self.stats, time.perf_counter
        self.streams.exchange_sees_compute()  # the inputs were written on the compute stream
        pending = self.start_gather(0) if self.programs else None
        scatters = []
        for bi, prog in enumerate(self.programs):
            t0 = clock()
            self.assemble_local(prog)
            stats.exchange_seconds += clock() - t0
            self.compute(prog.ready)  # overlaps the gather in flight
            self.compute(prog.replicas_ready, replicated=True)
            t0 = clock()
            if pending is not None:
                self.receive_gather(bi, pending)
            pending = self.start_gather(bi + 1) if bi + 1 < len(self.programs) else None
            stats.exchange_seconds += clock() - t0
            self.compute(prog.waiting)
            t0 = clock()
            if prog.scatter:
                scatters.append((bi, *self.start_scatter(bi)))
            stats.exchange_seconds += clock() - t0
            self.compute(prog.replicas_waiting, replicated=True)  # overlaps the scatter in flight
            t0 = clock()
            for src, soff, dst, doff, n in prog.own_out:  # this rank's rows of what it assembled
                self.outs[dst][:, doff:doff + n].copy_(self.outs[src][:, soff:soff + n])
            stats.exchange_seconds += clock() - t0
        t0 = clock()
        for bi, work, received in scatters:
            self.receive_scatter(bi, work, received)
        stats.exchange_seconds += clock() - t0
        return self.outputs

    def start_gather(self, bi: int):
        """Send this rank's pieces of bucket ``bi`` to their owners (and replica holders)."""
        prog = self.programs[bi]
        if not prog.gather:
            return None
        with self.streams.exchange():  # not queued behind the compute of earlier buckets
            send = [run.view(self.ins[run.source]).reshape(-1) for run in prog.gather_send]
            send_sizes, recv_sizes = prog.gather_sizes
            return self.ex._collective("gather", bi, send, sum(recv_sizes), send_sizes, recv_sizes, prog.wire,
                                       self.device, self.stats, (prog.gather_replicated, prog.replicated_recv))

    def assemble_local(self, prog: _Program) -> None:
        """The bucket's buffers ``[C, elements]`` of the units this rank computes but does not
        hold whole in one piece, with its own pieces in place (the others are read in place)."""
        for (dtype, c_in, c_out), numel in prog.buffers.items():
            key = ("buffer", (dtype, c_in, c_out))
            self.ins[key] = torch.empty(c_in, numel, dtype=dtype, device=self.device)
            self.outs[key] = torch.empty(c_out, numel, dtype=dtype, device=self.device)
        for src, soff, dst, doff, n in prog.own_in:
            self.ins[dst][:, doff:doff + n].copy_(self.ins[src][:, soff:soff + n])

    def receive_gather(self, bi: int, pending) -> None:
        """Wait for bucket ``bi``'s gather and copy the received pieces into the buffers."""
        work, received = pending
        self.ex._wait(work, "gather", bi)  # on CUDA: the compute stream waits for it
        self.streams.used_by_compute(received)
        offset = 0
        for run in self.programs[bi].gather_recv:
            n = run.wire_numel
            run.view(self.ins[run.source]).copy_(received[offset:offset + n].view(run.count, run.channels, run.numel))
            offset += n

    def compute(self, work: _Work, replicated: bool = False) -> None:
        """Run the batches of ``work``: each reads its blocks, runs its rule once, and writes its
        results (in place into this rank's outputs for units it holds whole)."""
        if not work.batches:
            return
        stats, clock = self.stats, time.perf_counter
        t = clock()
        for batch in work.batches:
            run_batch(batch, self.ins, self.outs, self.contexts)
        if replicated:  # no polar iterations by construction (plan.replicable); counted apart
            stats.replicated_flops += work.cost
        else:
            stats.polar_flops += work.polar_flops
        stats.compute_seconds += clock() - t

    def start_scatter(self, bi: int):
        """Send bucket ``bi``'s results to the ranks holding their rows."""
        prog, streams = self.programs[bi], self.streams
        streams.exchange_sees_compute()  # the results to send
        with streams.exchange():
            send = [run.view(self.outs[run.source]).reshape(-1) for run in prog.scatter_send]
            for key, t in self.outs.items():
                if key[0] == "buffer":
                    streams.used_by_exchange(t)
            send_sizes, recv_sizes = prog.scatter_sizes
            return self.ex._collective("scatter", bi, send, sum(recv_sizes), send_sizes, recv_sizes, prog.wire,
                                       self.device, self.stats)

    def receive_scatter(self, bi: int, work, received: Tensor) -> None:
        """Wait for bucket ``bi``'s scatter and copy this rank's rows into the outputs."""
        self.ex._wait(work, "scatter", bi)
        self.streams.used_by_compute(received)
        offset = 0
        for run in self.programs[bi].scatter_recv:
            n = run.wire_numel
            run.view(self.outs[run.source]).copy_(received[offset:offset + n].view(run.count, run.channels, run.numel))
            offset += n


class _Streams:
    """Where the exchange's packing and collectives are queued.

    On CUDA they go on a side stream: bucket k+1's gather must not wait in the compute stream's
    queue behind bucket k's polar kernels, or nothing overlaps. The compute stream waits for a
    collective's result (``work.wait()`` does that), the side stream waits for the compute
    stream before sending what it produced, and tensors made on one stream and read on the other
    are recorded on it so the caching allocator does not reuse them early. On CPU (gloo) every
    call is synchronous and this class does nothing.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.side = _side_stream(device)

    def exchange(self):
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def exchange_sees_compute(self) -> None:
        if self.cuda:
            self.side.wait_stream(self.compute)

    def used_by_compute(self, t: Tensor) -> None:
        if self.cuda:
            t.record_stream(self.compute)

    def used_by_exchange(self, t: Tensor) -> None:
        if self.cuda:
            t.record_stream(self.side)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device):
    return torch.cuda.Stream(device=device)


@dataclass
class _BucketView:
    """One bucket as this rank sees it: what it sends and receives (in wire order) and computes."""

    gather_send: list
    gather_recv: list
    gather_sizes: tuple
    scatter_send: list
    scatter_recv: list
    scatter_sizes: tuple
    ready: list
    waiting: list
    replicas_ready: list     # replicated units computed here, already whole here
    replicas_waiting: list   # ... and those completed by the gather
    replicated_recv: int     # elements of the gather this rank receives for replicated units
    whole: set               # uids of the units computed here that this rank holds whole, in one piece
    gather: bool
    scatter: bool
