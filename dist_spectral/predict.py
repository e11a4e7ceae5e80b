"""Predicted optimizer-step time and extra memory per rank, from a simulated step and stated rates.

A model of what :class:`~dist_spectral.exchange.Exchange` does, bucket by bucket, on every rank::

    t = 0: issue gather 0
    for bucket k:   compute the units already whole here   (overlaps gather k)
                    wait gather k; issue gather k+1
                    compute the units that arrived         (overlaps gather k+1, scatter k−1)
                    issue scatter k
                    compute the replicated units that arrived   (overlaps scatter k)
    wait every scatter

A replicated unit counts on every rank computing it (compute, memory, workspace); its pieces are
part of the gather's bytes.

Ranks progress independently. A communicator runs its collectives in issue order (g0, g1, s0,
g2, s1, …), so a rank's part of an all-to-all starts once it has finished its previous collective
and it and every peer it exchanges pieces with have issued this one; it then lasts
``latency + max(intra-node bytes / NVLink, inter-node bytes / network)``, each the larger of the
rank's sent and received bytes (ranks in the same node of ``gpus_per_node`` use NVLink). Compute is ``estimated flops / (rate · efficiency)`` (polar flops
for Muon-type rules, the rule's estimate for the spectral ones). Before the exchange, the
element-wise part (momentum, AdamW groups, row rules, the weight update) streams every local
element through memory, and row rules make their column all-reduces (ring: ``2 (W−1)/W`` of the
bytes). Host (Python) time is modelled apart, per rank, as ``host_fixed + host_per_param ·
parameters + host_per_unit · units``
(``units``: the whole-matrix units the rank computes or holds pieces of), with the constants
measured by ``benchmarks/host.py`` (see :class:`Rates`), and added to the step: a serial upper
bound, since on a GPU the host dispatches while the device works.

Extra memory (beyond weights, gradients and optimizer state), an upper bound per rank::

    outputs   4 · (local elements of the plan's parameters)          the directions, kept to the end
    + max over buckets k of
        8 · owned_k                    whole matrices and their results (fp32)
      + e · (gather_k + gather_k+1)    send and receive buffers in flight (e bytes per element)
      + e · Σ_{j ≤ k} scatter_j        scatter buffers, held until the final wait
      + workspace_k                    the largest batched polar of bucket k on this rank

    workspace of B stacked m×n blocks (s = min, l = max, w = iteration dtype bytes, 2 for bf16):
        B · (4 m n  +  max((4 + w) s l,  2 w (s l + s²),  8 m n))
      = the fp32 stack, plus the largest of: normalisation (fp32 copy and its cast), one quintic
        step (X, A = X Xᵀ, B = bA + cA², new X), and the fp32 result with its scaled copy.

Blocks of one rule key and shape are counted as one batch (the optimizer also splits by
orientation, so real batches are the same or smaller).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .planner import Simulation

# NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16 tensor core (1979 with sparsity), 3.35 TB/s
# HBM3, NVLink 4 at 900 GB/s bidirectional; one 400 Gb/s NDR InfiniBand adapter per GPU.
H100_BF16_DENSE = 989.4e12
H100_HBM = 3.35e12
NVLINK4_PER_DIRECTION = 450e9
IB_NDR_PER_DIRECTION = 50e9
# Host seconds of a step outside the exchange's collectives and the whole-matrix compute, fitted
# as fixed + per parameter × parameters + per unit × units by `benchmarks/host.py --clock cpu`
# (muon, one process, one thread, the stepping thread's CPU time) over its two width-4 series,
# where the element-wise work and the math are negligible beside the Python (a parameter costs
# about 55 Python calls a step; the units cost none, only bigger tensors), on a 2-core AMD EPYC,
# torch 2.13.0+cpu, Python 3.11.7; see benchmarks/results/host.md.
HOST_FIXED = 0.17e-3
HOST_PER_PARAM = 27e-6
HOST_PER_UNIT = 0.07e-6


@dataclass(frozen=True)
class Rates:
    """Hardware rates the prediction assumes (defaults: H100 SXM5 nodes of 8, one NDR adapter per GPU).

    Attributes:
        flops (float): matmul peak, flop/s (default: 989.4e12, H100 dense bf16).
        flops_efficiency (float): fraction of ``flops`` batched polar reaches (default: 0.5).
        bandwidth (float): inter-node bytes/s per GPU and direction (default: 50e9, 400 Gb/s NDR).
        nvlink_bandwidth (float): intra-node bytes/s per GPU and direction (default: 450e9).
        gpus_per_node (int): ranks sharing NVLink (default: 8).
        comm_efficiency (float): fraction of the link rates an all-to-all reaches (default: 0.8).
        latency (float): seconds per collective (default: 30e-6).
        hbm_bandwidth (float): memory bytes/s for element-wise work (default: 3.35e12).
        hbm_efficiency (float): fraction of ``hbm_bandwidth`` reached (default: 0.8).
        work_bytes (int): bytes per element of the polar iteration (default: 2, bf16).
        adamw_bytes (int): bytes moved per element by an AdamW step (default: 28: read and write
            fp32 weight, exp_avg, exp_avg_sq; read the gradient).
        momentum_bytes (int): the same for a one-buffer rule's element-wise part (default: 20).
        matrix_bytes (int): extra bytes per element of the plan's parameters (default: 16: copy
            into the gathered matrix and back out of the result, fp32).
        host_fixed (float): host (Python) seconds per step whatever the units (default:
            :data:`HOST_FIXED`, measured by ``benchmarks/host.py``).
        host_per_param (float): host seconds per optimized parameter a rank holds a piece of
            (default: :data:`HOST_PER_PARAM`, measured by ``benchmarks/host.py``).
        host_per_unit (float): host seconds per whole-matrix unit a rank computes or holds pieces
            of (default: :data:`HOST_PER_UNIT`, measured by ``benchmarks/host.py``).
    """

    flops: float = H100_BF16_DENSE
    flops_efficiency: float = 0.5
    bandwidth: float = IB_NDR_PER_DIRECTION
    nvlink_bandwidth: float = NVLINK4_PER_DIRECTION
    gpus_per_node: int = 8
    comm_efficiency: float = 0.8
    latency: float = 30e-6
    hbm_bandwidth: float = H100_HBM
    hbm_efficiency: float = 0.8
    work_bytes: int = 2
    adamw_bytes: int = 28
    momentum_bytes: int = 20
    matrix_bytes: int = 16
    host_fixed: float = HOST_FIXED
    host_per_param: float = HOST_PER_PARAM
    host_per_unit: float = HOST_PER_UNIT

    def describe(self) -> str:
        return (f"matmul {self.flops / 1e12:.1f} TFLOP/s × {self.flops_efficiency:g}, network "
                f"{self.bandwidth / 1e9:.0f} GB/s and NVLink {self.nvlink_bandwidth / 1e9:.0f} GB/s per GPU and "
                f"direction × {self.comm_efficiency:g} ({self.gpus_per_node} GPUs per node), {self.latency * 1e6:.0f} µs "
                f"per collective, HBM {self.hbm_bandwidth / 1e12:.2f} TB/s × {self.hbm_efficiency:g}; polar in "
                f"{8 * self.work_bytes}-bit; host {self.host_fixed * 1e3:.2f} ms + {self.host_per_param * 1e6:.2f} µs "
                f"per parameter + {self.host_per_unit * 1e6:.2f} µs per unit")


@dataclass(frozen=True)
class Prediction:
    """Per-rank predictions (numpy arrays of length W; seconds and bytes).

    Attributes:
        compute (ndarray): whole-matrix compute seconds.
        comm (ndarray): seconds of this rank's part in the all-to-alls (sum over collectives).
        exchange (ndarray): seconds from the first gather to the last scatter (compute included,
            overlapped as the exchange does).
        serial (ndarray): ``compute + comm``, nothing overlapped.
        elementwise (ndarray): momentum, element-wise rules and the weight update.
        colsum (ndarray): column-statistics all-reduces.
        host (ndarray): host (Python) seconds, ``host_fixed + host_per_param · params +
            host_per_unit · units``.
        units (ndarray): whole-matrix units each rank computes or holds pieces of.
        params (ndarray): optimized parameters each rank holds a piece of.
        step (ndarray): ``elementwise + colsum + exchange + host``: the predicted optimizer step.
        adamw (ndarray): an AdamW step on the same shards.
        peak_extra (ndarray): extra memory bytes (see the module docstring).
        state (ndarray): optimizer-state bytes (fp32).
        adamw_state (ndarray): AdamW's state bytes on the same shards.
        collectives (int): collectives per step (all-to-alls and all-reduces).
    """

    compute: np.ndarray
    comm: np.ndarray
    exchange: np.ndarray
    serial: np.ndarray
    elementwise: np.ndarray
    colsum: np.ndarray
    host: np.ndarray
    units: np.ndarray
    params: np.ndarray
    step: np.ndarray
    adamw: np.ndarray
    peak_extra: np.ndarray
    state: np.ndarray
    adamw_state: np.ndarray
    collectives: int

    def per_rank(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}


def _workspace(count: np.ndarray, m: np.ndarray, n: np.ndarray, w: int) -> np.ndarray:
    s, l = np.minimum(m, n), np.maximum(m, n)
    per = 4 * m * n + np.maximum(np.maximum((4 + w) * s * l, 2 * w * (s * l + s * s)), 8 * m * n)
    return count * per


def units_per_rank(plan) -> np.ndarray:
    """Whole-matrix units each rank computes (owner or replica) or sends or receives pieces of."""
    W, N = plan.world_size, len(plan.units)
    ranks, uids = [], []
    owned = [(u.owner, u.uid) for u in plan.units if not u.replicated]
    owned += [(r, u.uid) for u in plan.units if u.replicated for r in u.replicas]
    if owned:
        o = np.array(owned, dtype=np.int64)
        ranks.append(o[:, 0])
        uids.append(o[:, 1])
    for b in plan.buckets:
        for pieces in (b.gather, b.scatter):
            if len(pieces):
                ranks += [np.asarray(pieces.src, dtype=np.int64), np.asarray(pieces.dst, dtype=np.int64)]
                uids += [np.asarray(pieces.uid, dtype=np.int64)] * 2
    if not ranks:
        return np.zeros(W, dtype=np.int64)
    pairs = np.unique(np.concatenate(ranks) * N + np.concatenate(uids))
    return np.bincount(pairs // N, minlength=W)


def predict(sim: Simulation, rates: Rates = Rates()) -> Prediction:
    """Time and memory of one optimizer step on every rank of a simulated step."""
    plan = sim.plan
    W, e = plan.world_size, plan.element_bytes
    units = plan.units
    N = len(units)
    replicated = plan.replicated
    owner = np.fromiter((u.owner for u in units), dtype=np.int64, count=N)
    cost = np.fromiter((u.cost for u in units), dtype=np.float64, count=N)
    numel = np.fromiter((u.stop - u.start for u in units), dtype=np.int64, count=N)
    rate = rates.flops * rates.flops_efficiency
    node = np.arange(W) // rates.gpus_per_node

    incoming = np.zeros(N, dtype=bool)
    for b in plan.buckets:
        incoming[b.gather.uid] = True
    # Replicated units: one row per (unit, rank computing it); whether that rank receives pieces.
    rep_uid = np.array([u.uid for u in units if u.replicated for _ in u.replicas], dtype=np.int64)
    rep_rank = np.array([r for u in units if u.replicated for r in u.replicas], dtype=np.int64)
    rep_in = np.zeros(len(rep_uid), dtype=bool)
    if len(rep_uid):
        key = rep_uid * W + rep_rank  # ascending: units in order, replicas ascending
        for b in plan.buckets:
            g = b.gather.select(replicated[b.gather.uid])
            rep_in[np.searchsorted(key, g.uid * W + g.dst)] = True
    rep_bucket = np.array([units[u].bucket for u in rep_uid.tolist()], dtype=np.int64)

    # Batches for the workspace: per (bucket, rank, ready, rule key, block shape), counted.
    keys: dict[tuple, int] = {}
    key_of_param = [keys.setdefault(p.key, len(keys)) for p in plan.params]
    blocks = [(u.bucket, u.owner, int(incoming[u.uid]), key_of_param[u.param], *b.shape)
              for u in units if not u.replicated for b in u.spec.blocks]
    blocks += [(units[u].bucket, r, 2 + int(i), key_of_param[units[u].param], *b.shape)
               for u, r, i in zip(rep_uid.tolist(), rep_rank.tolist(), rep_in.tolist()) for b in units[u].spec.blocks]
    if blocks:
        rows, count = np.unique(np.array(blocks, dtype=np.int64), axis=0, return_counts=True)
        ws = _workspace(count, rows[:, 4], rows[:, 5], rates.work_bytes)
        workspace = {}
        bucket_ids, starts = np.unique(rows[:, 0], return_index=True)  # rows are sorted by bucket
        for k, a, z in zip(bucket_ids.tolist(), starts.tolist(), [*starts[1:].tolist(), len(rows)]):
            per_rank = np.zeros(W, dtype=np.int64)
            np.maximum.at(per_rank, rows[a:z, 1], ws[a:z])
            workspace[k] = per_rank
    else:
        workspace = {}

    def flows(pieces):
        """Per rank: elements sent / received within the node and across nodes."""
        n = pieces.numel
        same = node[pieces.src] == node[pieces.dst]
        out = []
        for col in (pieces.src, pieces.dst):
            out.append(np.bincount(col[same], n[same], minlength=W))
            out.append(np.bincount(col[~same], n[~same], minlength=W))
        return out  # send_in, send_out, recv_in, recv_out (elements)

    nv = rates.nvlink_bandwidth * rates.comm_efficiency
    ib = rates.bandwidth * rates.comm_efficiency
    compute = np.zeros(W)
    comm = np.zeros(W)
    t = np.zeros(W)       # each rank's program time
    free = np.zeros(W)    # when each rank's communicator has finished its previous collective
    collectives = 0
    peak = np.zeros(W)
    scatter_held = np.zeros(W)
    none = (np.zeros(W), np.zeros(W))

    def collective(issue: np.ndarray, pieces) -> tuple[np.ndarray, np.ndarray]:
        """An all-to-all issued at per-rank times: when it completes on each rank, and each rank's
        buffer bytes (sent + received)."""
        nonlocal free, comm, collectives
        if W == 1 or not len(pieces):
            return none
        si, so, ri, ro = flows(pieces)
        duration = rates.latency + np.maximum(np.maximum(si, ri) * e / nv, np.maximum(so, ro) * e / ib)
        start = np.maximum(issue, free)
        ready = start.copy()  # a rank's transfers start once it and every peer have reached this collective
        np.maximum.at(ready, pieces.dst, start[pieces.src])
        np.maximum.at(ready, pieces.src, start[pieces.dst])
        free = ready + duration
        comm = comm + duration
        collectives += 1
        return free, (si + so + ri + ro) * e

    buckets = plan.buckets
    pending = collective(t, buckets[0].gather) if buckets else none
    for k, b in enumerate(buckets):
        lo, hi = b.units[0], b.units[-1] + 1
        mine = ~replicated[lo:hi]
        o, c, wait = owner[lo:hi][mine], cost[lo:hi][mine], incoming[lo:hi][mine]
        ready = np.bincount(o[~wait], c[~wait], minlength=W) / rate
        waiting = np.bincount(o[wait], c[wait], minlength=W) / rate
        owned = np.bincount(o, numel[lo:hi][mine].astype(np.float64), minlength=W)
        here = rep_bucket == k
        r, rc, rw = rep_rank[here], cost[rep_uid[here]], rep_in[here]
        rep_ready = np.bincount(r[~rw], rc[~rw], minlength=W) / rate
        rep_waiting = np.bincount(r[rw], rc[rw], minlength=W) / rate
        owned = owned + np.bincount(r, numel[rep_uid[here]].astype(np.float64), minlength=W)
        compute += ready + waiting + rep_ready + rep_waiting
        t = t + ready + rep_ready
        done, gather_buffers = pending
        t = np.maximum(t, done)
        pending = collective(t, buckets[k + 1].gather) if k + 1 < len(buckets) else none
        t = t + waiting
        _, scatter_buffers = collective(t, b.scatter)
        t = t + rep_waiting
        scatter_held = scatter_held + scatter_buffers
        peak = np.maximum(peak, 8 * owned + gather_buffers + pending[1] + scatter_held
                          + workspace.get(k, np.zeros(W)))
    exchange = np.maximum(t, free)  # every scatter waited for
    peak = peak + 4 * np.asarray(sim.matrix_numel, dtype=np.float64)

    hbm = rates.hbm_bandwidth * rates.hbm_efficiency
    local = np.asarray(sim.local_numel, dtype=np.float64)
    matrix = np.asarray(sim.matrix_numel, dtype=np.float64)
    state = 4 * np.asarray(sim.state_numel, dtype=np.float64)
    two_buffers = state / 4 - local  # elements of AdamW groups (they keep two buffers)
    elementwise = (local * rates.momentum_bytes + two_buffers * (rates.adamw_bytes - rates.momentum_bytes)
                   + matrix * rates.matrix_bytes) / hbm
    colsum_time = 0.0
    if W > 1:
        ring = 2 * (W - 1) / W
        bw = (rates.bandwidth if W > rates.gpus_per_node else rates.nvlink_bandwidth) * rates.comm_efficiency
        colsum_time = sum(rates.latency + ring * 4 * n / bw for n in sim.colsum_sizes)
        collectives += len(sim.colsum_sizes)
    colsum = np.full(W, colsum_time)
    unit_count = units_per_rank(plan)
    param_count = np.asarray(sim.local_params or (0,) * W, dtype=np.int64)
    host = rates.host_fixed + rates.host_per_param * param_count + rates.host_per_unit * unit_count
    return Prediction(compute=compute, comm=comm, exchange=exchange, serial=compute + comm, elementwise=elementwise,
                      colsum=colsum, host=host, units=unit_count, params=param_count, step=elementwise + colsum + exchange + host,
                      adamw=local * rates.adamw_bytes / hbm,
                      peak_extra=peak, state=state, adamw_state=8 * local, collectives=collectives)


def summary_rows(sim: Simulation, pred: Prediction, worst: int = 4, every: bool = False) -> list[tuple[str, dict]]:
    """Rows for a per-rank table: every rank when W ≤ 16 or ``every``, else max / mean / min and the
    ``worst`` ranks by predicted step time."""
    plan = sim.plan
    W = plan.world_size
    cols = {
        "polar GFLOP": np.array([plan.polar_flops(r) for r in range(W)], dtype=np.float64) / 1e9,
        "gather out MB": np.array([plan.bytes_sent(r, "gather") for r in range(W)], dtype=np.float64) / 1e6,
        "gather in MB": np.array([plan.bytes_received(r, "gather") for r in range(W)], dtype=np.float64) / 1e6,
        "scatter out MB": np.array([plan.bytes_sent(r, "scatter") for r in range(W)], dtype=np.float64) / 1e6,
        "scatter in MB": np.array([plan.bytes_received(r, "scatter") for r in range(W)], dtype=np.float64) / 1e6,
        "replicate in MB": np.array([plan.bytes_received(r, "replicate") for r in range(W)], dtype=np.float64) / 1e6,
        "colsum MB": np.full(W, sim.colsum_bytes / 1e6),
        "peak extra GB": pred.peak_extra / 1e9,
        "compute ms": pred.compute * 1e3,
        "host ms": pred.host * 1e3,
        "step ms": pred.step * 1e3,
        "AdamW ms": pred.adamw * 1e3,
    }
    if W <= 16 or every:
        return [(str(r), {k: v[r] for k, v in cols.items()}) for r in range(W)]
    rows = [("max", {k: v.max() for k, v in cols.items()}), ("mean", {k: v.mean() for k, v in cols.items()}),
            ("min", {k: v.min() for k, v in cols.items()})]
    for r in np.argsort(-pred.step, kind="stable")[:worst].tolist():
        rows.append((f"rank {r}", {k: v[r] for k, v in cols.items()}))
    return rows


def format_table(rows: list[tuple[str, dict]]) -> str:
    if not rows:
        return ""
    names = list(rows[0][1])
    width = [max(len(n), 9) for n in names]
    lines = [f"{'rank':>8} " + " ".join(f"{n:>{w}}" for n, w in zip(names, width))]
    for label, vals in rows:
        lines.append(f"{label:>8} " + " ".join(f"{vals[n]:>{w}.3f}" for n, w in zip(names, width)))
    return "\n".join(lines)


__all__ = ["Rates", "Prediction", "predict", "units_per_rank", "summary_rows", "format_table", "HOST_FIXED",
           "HOST_PER_PARAM", "HOST_PER_UNIT"]
