"""Execute a :class:`~dist_spectral.plan.Plan` on one rank: gather, compute, scatter back.

Per bucket (``W`` = 3, a matrix sharded by rows, owner rank 1)::

    rank 0 ──rows 0:k──►┐                        ┌──rows 0:k──► rank 0
    rank 1 (owner) ─────┼─► whole matrix ─► rule ┤ (keeps its own rows)
    rank 2 ──rows 2k:──►┘                        └──rows 2k:──► rank 2
         all_to_all_single #1                 all_to_all_single #2

Bucket k+1's gather is in flight while bucket k computes, and bucket k's scatter is in flight
while bucket k+1 computes (``async_op=True``). Pieces are packed by destination rank in plan
order, so both sides agree on offsets without sending any metadata.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .compute import MatrixJob, run_jobs
from .plan import Plan, Unit


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


@dataclass
class ExchangeStats:
    """What one step moved and computed on this rank."""

    bytes_sent: dict = field(default_factory=lambda: {"gather": 0, "scatter": 0})
    bytes_received: dict = field(default_factory=lambda: {"gather": 0, "scatter": 0})
    collectives: int = 0
    polar_flops: int = 0
    exchange_seconds: float = 0.0
    compute_seconds: float = 0.0


class Exchange:
    """This rank's view of a plan: which pieces it sends, receives, owns and computes.

    Args:
        plan (Plan): the shared plan.
        rank (int): this rank in ``group``.
        group: the process group the plan's ranks index (default: the world), or ``None`` on
            one process.
        comm_dtype (torch.dtype | None): dtype on the wire (default: the data's dtype).
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
        self._offsets: dict[tuple[int, int], dict[int, int]] = {}

    # ----- helpers -----
    def _local_slice(self, inputs: dict[int, Tensor], unit: Unit, start: int, stop: int) -> Tensor:
        layout = self.plan.params[unit.param].layout
        off = layout.local_offset(self.rank, start)
        return inputs[unit.param][off:off + stop - start]

    def _owned_parts(self, unit: Unit):
        """This rank's own element ranges of a unit."""
        layout = self.plan.params[unit.param].layout
        for a, b in layout.holdings[self.rank]:
            lo, hi = max(a, unit.start), min(b, unit.stop)
            if hi > lo:
                yield lo, hi

    def _collective(self, phase: str, bucket_index: int, send: list[Tensor], recv_numel: int, send_sizes, recv_sizes,
                    dtype: torch.dtype, stats: ExchangeStats):
        wire = self.comm_dtype or dtype
        payload = torch.cat(send).to(wire) if send else torch.empty(0, dtype=wire)
        out = torch.empty(recv_numel, dtype=wire)
        stats.bytes_sent[phase] += payload.numel() * payload.element_size()
        stats.bytes_received[phase] += out.numel() * out.element_size()
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

    # ----- the step -----
    def run(self, inputs: dict[int, Tensor], make_job: Callable[[Unit, Tensor], MatrixJob],
            stats: ExchangeStats | None = None) -> tuple[dict[int, Tensor], ExchangeStats]:
        """Directions for every whole-matrix parameter, as flat local tensors.

        Args:
            inputs: plan parameter position → flat local direction input (contiguous, 1-D).
            make_job: builds the compute job of a unit from its whole ``[rows, n]`` matrix.
        """
        stats = stats or ExchangeStats()
        outputs = {pos: torch.empty_like(x) for pos, x in inputs.items()}
        dtype = next(iter(inputs.values())).dtype if inputs else torch.float32
        plan, rank, W = self.plan, self.rank, self.plan.world_size

        def start_gather(bi):
            bucket = plan.buckets[bi]
            if not self._needs_collective(bucket, "gather"):
                return None
            send_sizes, recv_sizes = bucket.split_sizes(rank, W, "gather")
            mine = sorted((p for p in bucket.gather if p.src == rank), key=lambda p: p.dst)
            send = [self._local_slice(inputs, plan.units[p.uid], p.start, p.stop) for p in mine]
            return self._collective("gather", bi, send, sum(recv_sizes), send_sizes, recv_sizes, dtype, stats)

        pending = start_gather(0) if plan.buckets else None
        scatters = []
        for bi, bucket in enumerate(plan.buckets):
            t0 = time.perf_counter()
            received = None
            if pending is not None:
                work, received = pending
                self._wait(work, "gather", bi)
            pending = start_gather(bi + 1) if bi + 1 < len(plan.buckets) else None
            # Assemble the units this rank owns: own rows first, then received pieces (by source rank).
            owned = [plan.units[u] for u in bucket.units if plan.units[u].owner == rank]
            mats = {u.uid: torch.empty(u.stop - u.start, dtype=dtype) for u in owned}
            for u in owned:
                for a, b in self._owned_parts(u):
                    mats[u.uid][a - u.start:b - u.start].copy_(self._local_slice(inputs, u, a, b))
            if received is not None:
                offset = 0
                for p in sorted((p for p in bucket.gather if p.dst == rank), key=lambda p: p.src):
                    u = plan.units[p.uid]
                    mats[u.uid][p.start - u.start:p.stop - u.start].copy_(received[offset:offset + p.numel])
                    offset += p.numel
            t1 = time.perf_counter()
            jobs = [make_job(u, mats[u.uid].view(u.spec.rows, -1)) for u in owned]
            results, flops = run_jobs(jobs)
            stats.polar_flops += flops
            t2 = time.perf_counter()
            flat = {u.uid: r.reshape(-1) for u, r in zip(owned, results)}
            for u in owned:
                for a, b in self._owned_parts(u):
                    self._local_slice(outputs, u, a, b).copy_(flat[u.uid][a - u.start:b - u.start])
            if self._needs_collective(bucket, "scatter"):
                send_sizes, recv_sizes = bucket.split_sizes(rank, W, "scatter")
                mine = sorted((p for p in bucket.scatter if p.src == rank), key=lambda p: p.dst)
                send = [flat[p.uid][p.start - plan.units[p.uid].start:p.stop - plan.units[p.uid].start] for p in mine]
                scatters.append((bi, *self._collective("scatter", bi, send, sum(recv_sizes), send_sizes, recv_sizes,
                                                       dtype, stats)))
            t3 = time.perf_counter()
            stats.exchange_seconds += (t1 - t0) + (t3 - t2)
            stats.compute_seconds += t2 - t1
        t0 = time.perf_counter()
        for bi, work, received in scatters:
            self._wait(work, "scatter", bi)
            offset = 0
            for p in sorted((p for p in plan.buckets[bi].scatter if p.dst == rank), key=lambda p: p.src):
                u = plan.units[p.uid]
                self._local_slice(outputs, u, p.start, p.stop).copy_(received[offset:offset + p.numel])
                offset += p.numel
        stats.exchange_seconds += time.perf_counter() - t0
        return outputs, stats
