"""What one optimizer step moved and computed on this rank (``opt.last_stats``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepStats:
    """Counters of the last step on this rank (bytes are on the wire, flops are polar iterations).

    The exchange fills the ``gather``/``replicate``/``scatter`` entries and the flops and seconds of
    whole-matrix rules; the optimizer adds the ``colsum`` entry, ``step_seconds``, ``host_seconds``
    and ``skipped``.

    Attributes:
        bytes_sent (dict): per collective (``gather``, ``scatter``, ``colsum``) bytes this rank sent;
            ``replicate``: the part of the gather collective that carries replicated units.
        bytes_received (dict): the same, received.
        collectives (int): all_to_all calls of the exchange.
        polar_flops (int): flops of polar iterations run on this rank (each unit on one rank).
        replicated_flops (int): estimated flops of the replicated units computed on this rank
            (each also computed on the other ranks holding part of it).
        exchange_seconds (float): time in packing, collectives and unpacking.
        compute_seconds (float): time in whole-matrix rule computation.
        step_seconds (float): the whole ``step()``.
        skipped (bool): the step was skipped for a non-finite gradient.
        host_seconds (float): the part of ``step_seconds`` outside the exchange and the
            whole-matrix compute: the optimizer's own work per parameter (its items, the non-finite
            check, momentum, row rules, the update) and its Python. A host cost that grows with
            the number of units instead of parameters would show here and in ``compute_seconds``
            (``benchmarks/host.py`` measures it apart from the math).
    """

    bytes_sent: dict = field(default_factory=dict)
    bytes_received: dict = field(default_factory=dict)
    collectives: int = 0
    polar_flops: int = 0
    replicated_flops: int = 0
    exchange_seconds: float = 0.0
    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    skipped: bool = False
    host_seconds: float = 0.0  # last: positional construction of the older fields is unchanged

    def add(self, other: StepStats) -> StepStats:
        """Add ``other`` into these counters (DeepSpeed calls ``step()`` several times per step)
        and return them; ``skipped`` is set if either was."""
        for mine, theirs in ((self.bytes_sent, other.bytes_sent), (self.bytes_received, other.bytes_received)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.collectives += other.collectives
        self.polar_flops += other.polar_flops
        self.replicated_flops += other.replicated_flops
        self.exchange_seconds += other.exchange_seconds
        self.compute_seconds += other.compute_seconds
        self.step_seconds += other.step_seconds
        self.host_seconds += other.host_seconds
        self.skipped |= other.skipped
        return self


__all__ = ["StepStats"]
