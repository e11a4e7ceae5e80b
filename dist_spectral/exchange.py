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
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .compute import MatrixJob, run_jobs
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

    # ----- helpers -----
    def _local_slice(self, inputs: dict[int, Tensor], unit: Unit, start: int, stop: int) -> Tensor:
        """Elements ``[start, stop)`` of the unit's parameter, every channel: ``[C, stop - start]``."""
        layout = self.plan.params[unit.param].layout
        off = layout.local_offset(self.rank, start)
        return inputs[unit.param][:, off:off + stop - start]

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
    def run(self, inputs: dict[int, Tensor], make_job: Callable[[Unit, Tensor], MatrixJob],
            stats: StepStats) -> dict[int, Tensor]:
        """Directions for every whole-matrix parameter, as flat local tensors.

        Per bucket: units whose rows are all on this rank (``ready``) are computed while the
        bucket's gather is in flight; the others once it lands.

        Args:
            inputs: plan parameter position → flat local direction input, 1-D, or ``[C, local]``
                with C the parameter's gather channels (its inputs, then its carried state).
            make_job: builds the compute job of a unit from its whole ``[C, rows, n]`` channels.
            stats (StepStats): the step's counters; bytes, flops and seconds are added to them.

        Returns:
            position → the direction (1-D where the input was), or ``[C', local]`` with C' the
            scatter channels (the direction, then the new carried state).
        """
        for counts in (stats.bytes_sent, stats.bytes_received):
            for phase in ("gather", "replicate", "scatter"):
                counts.setdefault(phase, 0)
        flat_inputs = {pos for pos, x in inputs.items() if x.dim() == 1}
        inputs = {pos: x.view(1, -1) if x.dim() == 1 else x for pos, x in inputs.items()}
        for pos, x in inputs.items():
            if x.shape[0] != self.plan.params[pos].channels[0]:
                raise ValueError(f"{self.plan.params[pos].name}: {x.shape[0]} input channels, the plan expects "
                                 f"{self.plan.params[pos].channels[0]}")
        outputs = _Run(self, inputs, make_job, stats).all_buckets()
        return {pos: (o[0] if pos in flat_inputs and o.shape[0] == 1 else o) for pos, o in outputs.items()}


class _Run:
    """One :meth:`Exchange.run`: the buffers of a step and its named phases, bucket by bucket."""

    def __init__(self, exchange: Exchange, inputs: dict[int, Tensor], make_job: Callable[[Unit, Tensor], MatrixJob],
                 stats: StepStats):
        self.ex, self.plan, self.views = exchange, exchange.plan, exchange._views
        self.inputs, self.make_job, self.stats = inputs, make_job, stats
        self.outputs = {pos: x.new_empty(self.plan.params[pos].channels[1], x.shape[1]) for pos, x in inputs.items()}
        first = next(iter(inputs.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        # Parameters may differ in dtype (a bf16 model with its router kept in fp32): each unit is
        # assembled and computed in its own parameter's dtype, as it is when whole on one rank, so
        # the result does not depend on the number of ranks; only the wire is per bucket.
        self.dtypes = {pos: x.dtype for pos, x in inputs.items()}
        self.wires = [exchange._wire_dtype(bucket, self.dtypes) for bucket in self.plan.buckets]
        self.streams = _Streams(self.device)

    def channels(self, u: Unit, phase: int) -> int:
        return self.plan.params[u.param].channels[phase]

    def all_buckets(self) -> dict[int, Tensor]:
        """Run every bucket, overlapping bucket k+1's gather and bucket k's scatter with compute."""
        stats, clock = self.stats, time.perf_counter
        self.streams.exchange_sees_compute()  # the inputs were written on the compute stream
        pending = self.start_gather(0) if self.plan.buckets else None
        scatters = []
        for bi, v in enumerate(self.views):
            t0 = clock()
            mats = self.assemble_local(v)
            stats.exchange_seconds += clock() - t0
            results: dict[int, Tensor] = {}
            self.compute(v.ready, mats, v.whole, results)  # overlaps the gather in flight
            self.compute(v.replicas_ready, mats, v.whole, {}, replicated=True)
            t0 = clock()
            if pending is not None:
                self.receive_gather(bi, pending, mats)
            pending = self.start_gather(bi + 1) if bi + 1 < len(self.views) else None
            stats.exchange_seconds += clock() - t0
            self.compute(v.waiting, mats, v.whole, results)
            t0 = clock()
            if v.scatter:
                scatters.append((bi, *self.start_scatter(bi, results)))
            stats.exchange_seconds += clock() - t0
            self.compute(v.replicas_waiting, mats, v.whole, {}, replicated=True)  # overlaps the scatter in flight
        t0 = clock()
        for bi, work, received in scatters:
            self.receive_scatter(bi, work, received)
        stats.exchange_seconds += clock() - t0
        return self.outputs

    def start_gather(self, bi: int):
        """Send this rank's pieces of bucket ``bi`` to their owners (and replica holders)."""
        v, plan = self.views[bi], self.plan
        if not v.gather:
            return None
        with self.streams.exchange():  # not queued behind the compute of earlier buckets
            send = [self.ex._local_slice(self.inputs, plan.units[p.uid], p.start, p.stop).reshape(-1)
                    for p in v.gather_send]
            replicated = sum(t.numel() for t, p in zip(send, v.gather_send) if plan.units[p.uid].replicated)
            send_sizes, recv_sizes = v.gather_sizes
            return self.ex._collective("gather", bi, send, sum(recv_sizes), send_sizes, recv_sizes, self.wires[bi],
                                       self.device, self.stats, (replicated, v.replicated_recv))

    def assemble_local(self, v: _BucketView) -> dict[int, Tensor]:
        """Buffers ``[C, elements]`` of the units this rank computes in a bucket, with its own
        pieces in place: a unit whole here in one piece is read in place, the others are assembled."""
        ex = self.ex
        local = v.ready + v.waiting + v.replicas_ready + v.replicas_waiting
        mats = {u.uid: (ex._local_slice(self.inputs, u, u.start, u.stop) if u.uid in v.whole else
                        torch.empty(self.channels(u, 0), u.stop - u.start, dtype=self.dtypes[u.param], device=self.device))
                for u in local}
        for u in local:
            if u.uid in v.whole:
                continue
            for a, b in ex._owned_parts(u):
                mats[u.uid][:, a - u.start:b - u.start].copy_(ex._local_slice(self.inputs, u, a, b))
        return mats

    def receive_gather(self, bi: int, pending, mats: dict[int, Tensor]) -> None:
        """Wait for bucket ``bi``'s gather and copy the received pieces into ``mats``."""
        work, received = pending
        self.ex._wait(work, "gather", bi)  # on CUDA: the compute stream waits for it
        self.streams.used_by_compute(received)
        offset = 0
        for p in self.views[bi].gather_recv:
            u = self.plan.units[p.uid]
            c = self.channels(u, 0)
            piece = received[offset:offset + c * p.numel].view(c, p.numel)
            mats[u.uid][:, p.start - u.start:p.stop - u.start].copy_(piece)
            offset += c * p.numel

    def job(self, u: Unit, mat: Tensor, whole: set) -> MatrixJob:
        """The compute job of unit ``u`` from its whole buffer ``mat``; a unit this rank holds whole
        (in ``whole``) writes straight into this rank's output rows."""
        j = self.make_job(u, mat.view(self.channels(u, 0), u.spec.rows, -1))
        if u.uid in whole:
            out = self.ex._local_slice(self.outputs, u, u.start, u.stop).view(self.channels(u, 1), u.spec.rows, -1)
            j.out = out if j.rule.stateful else out[0]
        return j

    def compute(self, units: list[Unit], mats: dict[int, Tensor], whole: set, results: dict[int, Tensor],
                replicated: bool = False) -> None:
        """Run the rules of ``units``; each result goes into ``results`` (by unit id, for the
        scatter) and this rank's own rows of it into the outputs."""
        if not units:
            return
        stats, clock = self.stats, time.perf_counter
        t = clock()
        out, flops = run_jobs([self.job(u, mats[u.uid], whole) for u in units])
        if replicated:  # no polar iterations by construction (plan.replicable); counted apart
            stats.replicated_flops += sum(u.cost for u in units)
        else:
            stats.polar_flops += flops
        stats.compute_seconds += clock() - t
        for u, r in zip(units, out):
            results[u.uid] = r.reshape(self.channels(u, 1), -1)
            if u.uid in whole:
                continue  # already written in place
            for a, b in self.ex._owned_parts(u):
                self.ex._local_slice(self.outputs, u, a, b).copy_(results[u.uid][:, a - u.start:b - u.start])

    def start_scatter(self, bi: int, results: dict[int, Tensor]):
        """Send bucket ``bi``'s results to the ranks holding their rows."""
        v, plan, streams = self.views[bi], self.plan, self.streams
        streams.exchange_sees_compute()  # the results to send
        with streams.exchange():
            send = [results[p.uid][:, p.start - plan.units[p.uid].start:p.stop - plan.units[p.uid].start].reshape(-1)
                    for p in v.scatter_send]
            for t in results.values():
                streams.used_by_exchange(t)
            send_sizes, recv_sizes = v.scatter_sizes
            return self.ex._collective("scatter", bi, send, sum(recv_sizes), send_sizes, recv_sizes, self.wires[bi],
                                       self.device, self.stats)

    def receive_scatter(self, bi: int, work, received: Tensor) -> None:
        """Wait for bucket ``bi``'s scatter and copy this rank's rows into the outputs."""
        self.ex._wait(work, "scatter", bi)
        self.streams.used_by_compute(received)
        offset = 0
        for p in self.views[bi].scatter_recv:
            u = self.plan.units[p.uid]
            c = self.channels(u, 1)
            piece = received[offset:offset + c * p.numel].view(c, p.numel)
            self.ex._local_slice(self.outputs, u, p.start, p.stop).copy_(piece)
            offset += c * p.numel


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
