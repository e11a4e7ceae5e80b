"""Row rules on rows cut by tensor parallel and repeated by HSDP replicas, ranks as threads.

A row-parallel weight under HSDP × TP is ``(Replicate(), Shard(1))`` on ``(replicate, tp)``: every
row is cut between the ``tp`` ranks and every element is held twice. The row view's statistics
(column sums, cut-row sums, the matrix total) must count each element once over the whole group:
the direction on the pieces, reassembled, equals the rule on the whole matrix on every rank.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from dist_spectral.engines.collectives import Collectives
from dist_spectral.engines.dtensor import placement_layout
from dist_spectral.engines.rows import row_view
from dist_spectral.rules import get_rule


class ThreadRanks(Collectives):
    """W ranks as threads of one process; all-reduce through a barrier."""

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier, slots: list):
        self.rank, self.world_size, self._barrier, self._slots = rank, world_size, barrier, slots
        self.group, self.timeout = None, None

    def all_reduce_sum(self, tensor, what):
        self._slots[self.rank] = tensor.clone()
        self._barrier.wait()
        total = sum(self._slots)
        self._barrier.wait()
        return tensor.copy_(total)


def directions(layout, full: torch.Tensor, rule_name: str) -> list[torch.Tensor]:
    """Each rank's direction on its piece of ``full``, placed in a zero tensor of the full shape."""
    W, rule = layout.world_size, get_rule(rule_name)
    group = dict(rule.defaults)
    barrier, slots, out, errors = threading.Barrier(W), [None] * W, [None] * W, []

    def rank_main(r):
        try:
            local = torch.cat([full.reshape(-1)[a:b] for a, b in layout.holdings[r]])
            x, stats, back = row_view(layout, local, ThreadRanks(r, W, barrier, slots))
            u = back(rule.direction(x, axis="rows", transposed=False, group=group, stats=stats))
            mine, offset = torch.zeros(full.numel()), 0
            for a, b in layout.holdings[r]:
                mine[a:b] = u[offset:offset + b - a]
                offset += b - a
            out[r] = mine.reshape(full.shape)
        except Exception as e:  # surfaced below; a dead thread would otherwise hang the barrier
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("rule_name", ["centered_row_norm", "row_norm"])
@pytest.mark.parametrize("placements", [(Replicate(), Shard(1)), (Shard(0), Shard(1)), (Replicate(), Shard(0))],
                         ids=["hsdp-tp", "dp-tp", "hsdp"])
def test_each_element_counted_once(rule_name, placements):
    shape = (11, 7)  # uneven: tp cuts 4 + 3 columns, dp 6 + 5 rows
    layout = placement_layout(shape, ((0, 1), (2, 3)), placements, 4)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    full[1] = 0  # a zero row, as the optimizer's tests have
    rule = get_rule(rule_name)
    want = rule.direction(full, axis="rows", transposed=False, group=dict(rule.defaults))
    for r, got in enumerate(directions(layout, full, rule_name)):
        held = torch.zeros(full.numel(), dtype=torch.bool)
        for a, b in layout.holdings[r]:
            held[a:b] = True
        held = held.reshape(shape)
        torch.testing.assert_close(got[held], want[held], rtol=1e-6, atol=1e-7, msg=f"rank {r}")
