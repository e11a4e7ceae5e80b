"""A non-finite gradient under DeepSpeed ZeRO skips the whole training step, never part of it.

DeepSpeed calls ``step()`` once per group (ZeRO-1/2) or sub-group (ZeRO-3): a NaN or Inf in the
first, a middle or the last of them, on one rank of W = 2, must leave every flat, every state
tensor and every parameter bit for bit as before, count one skipped step, and the next clean step
must train again. Workers are in tests/distributed/ds_nonfinite.py; one process group runs all.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.distributed.ds_harness import launch  # noqa: E402
from tests.distributed.ds_nonfinite import VALUES, WHERE  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds_nonfinite")
    launch(WORLD, "tests.distributed.ds_nonfinite:worker", d)
    return [torch.load(d / f"result{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3_subgroups"])
def test_skip_is_whole_and_counted_once(ranks, engine, where, value):
    for rank, res in enumerate(ranks):
        case = res[engine]["cases"][(where, value)]
        assert case["error"] is None, case["error"]
        assert case["calls"] == res[engine]["flats"], "DeepSpeed should call step() once per flat"
        assert case["untouched"], f"{engine} rank {rank}: {value} in {case['param']} (flat {case['index']}) " \
                                  "changed weights or state"
        assert case["skipped"] == 1 and case["ds_skipped"] == 0
        # num_steps counts training steps, not DeepSpeed's one step() call per flat
        assert case["counted"] == 1 and case["next_counted"] == 1
        assert case["next_step_moved"]


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", WHERE)
def test_zero3_deepspeed_skips_before_the_optimizer(ranks, where, value):
    """ZeRO-3 checks the global gradient norm itself: the optimizer is not called, nothing moves."""
    for res in ranks:
        case = res["zero3_ds_skips"]["cases"][(where, value)]
        assert case["calls"] == 0 and case["untouched"] and case["ds_skipped"] == 1 and case["skipped"] == 0
        assert case["next_step_moved"]


def test_raise_in_the_last_group_updates_nothing(ranks):
    for res in ranks:
        case = res["zero2_raise"]["cases"][("last", "nan")]
        assert case["error"].startswith("NonFiniteGradientError")
        last = res["zero2_raise"]["flats"] - 1  # named although DeepSpeed has not formed its flat gradient yet
        assert f"DeepSpeed flat {last}," in case["error"] and case["calls"] == 1 and case["untouched"]
