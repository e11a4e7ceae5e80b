"""Names in a run config are checked before anything starts (``dist_spectral/training/names.py``):
the entry point's ``main`` stops with one line naming the key, the value and the known values,
without starting a process group or building anything."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from dist_spectral.training import loop, main
from dist_spectral.training.config import load_config
from dist_spectral.training.names import check_names

# Each bad name, and what its one line must say.
BAD = [
    (["optim.recipe=symetric"], ["optim.recipe='symetric'", "did you mean 'symmetric'?", "muon"]),
    (["model.preset=tiny-olmo"], ["model.preset='tiny-olmo'", "did you mean 'tiny-olmoe'?", "tiny-llama"]),
    (["model=tiny-lama"], ["model.preset='tiny-lama'", "did you mean 'tiny-llama'?"]),
    (["parallel=fsdpp"], ["parallel config 'fsdpp'", "did you mean 'fsdp'?", "hsdp"]),
    (["optim.recipe=missing.yaml"], ["optim.recipe='missing.yaml'", "no file missing.yaml"]),
    (["optim.overrides.mlpp.lr=0.1"], ["optim.overrides", "'mlpp'", "attention"]),
    (["parallel.engine=deepspeed", "parallel.deepspeed.config=zero22"],
     ["parallel.deepspeed.config='zero22'", "did you mean 'zero2'?", "zero3"]),
    (["data.source=memmap", "data.path=no/such/dir"], ["data.path='no/such/dir' does not exist"]),
    (["data.source=text"], ["data.source=text needs data.path"]),
    (["data.tokenizer=gpt2"], ["data.tokenizer='gpt2'", "byte-tokenised"]),
]


@pytest.fixture
def nothing_may_start(monkeypatch):
    """``main`` must return before the loop, its process group or its model exist."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started before its names were checked")

    monkeypatch.setattr(loop, "train", refuse)
    monkeypatch.setattr(loop, "init_distributed", refuse)
    monkeypatch.delenv("RANK", raising=False)


@pytest.mark.parametrize("overrides, says", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_name_stops_main_with_one_line(overrides, says, nothing_may_start, capsys):
    assert main(["parallel=none", *overrides]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), err
    for fragment in says:
        assert fragment in lines[0]
    assert not dist.is_initialized()


def test_other_ranks_exit_with_the_same_status_quietly(nothing_may_start, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["optim.recipe=symetric"]) == 2
    assert capsys.readouterr() == ("", "")


def test_every_tiny_run_config_passes():
    for run in ("tiny-olmoe-fsdp", "tiny-olmoe-zero2", "tiny-olmoe-ep", "tiny-llama-single"):
        check_names(load_config(run))  # raises on a bad name

