"""Hugging Face ``Trainer`` with ``optimizers=(build_optimizer(model), paper_schedule(...))`` on one
process: its losses are our own loop's, and a run checkpointed and resumed halfway ends bit for bit
where the uninterrupted run ends, step counters included."""
from __future__ import annotations

import pytest
import torch

import dist_spectral
from tests.integrations.hf_common import TokenDataset, own_loop
from tests.tiny import tiny_olmoe, tiny_qwen3

pytest.importorskip("accelerate")  # transformers' Trainer needs it; conftest stops the suite if it is missing
from transformers import Trainer, TrainingArguments  # noqa: E402

STEPS, BATCH, CLIP = 8, 4, 1.0


def build(model_fn, recipe: str):
    model = model_fn()
    opt = dist_spectral.build_optimizer(model, recipe)
    return model, opt, dist_spectral.paper_schedule(opt, total_steps=STEPS, warmup=2)


def train(out, model_fn, recipe: str, max_steps: int, save: bool = False, resume=None, model=None):
    """A Trainer run (a fresh model unless ``model`` is given); its model, optimizer and losses."""
    fresh, opt, sched = build(model_fn, recipe)
    if model is not None:  # the weights a resume must start from; rebuild the optimizer on them
        fresh = model
        opt = dist_spectral.build_optimizer(model, recipe)
        sched = dist_spectral.paper_schedule(opt, total_steps=STEPS, warmup=2)
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=BATCH, max_grad_norm=CLIP,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], use_cpu=True, seed=0,
        save_strategy="steps" if save else "no", save_steps=STEPS // 2, disable_tqdm=True)
    trainer = Trainer(model=fresh, args=args, train_dataset=TokenDataset(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return fresh, opt, [r["loss"] for r in trainer.state.log_history if "loss" in r]


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert (sa["num_steps"], sa["skipped_steps"]) == (sb["num_steps"], sb["skipped_steps"])
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key]), (k, key)


@pytest.mark.parametrize("model_fn,recipe", [(tiny_qwen3, "symmetric"), (tiny_olmoe, "symmetric"), (tiny_qwen3, "muon")],
                         ids=["qwen3-symmetric", "olmoe-symmetric", "qwen3-muon"])
def test_trainer_losses_are_our_loops(tmp_path, model_fn, recipe):
    _, opt, losses = train(tmp_path / "trainer", model_fn, recipe, STEPS)
    model, own_opt, sched = build(model_fn, recipe)
    own = own_loop(model, own_opt, sched, TokenDataset().ids, BATCH, STEPS, CLIP)
    assert opt.num_steps == own_opt.num_steps == STEPS
    assert losses == pytest.approx(own, rel=0, abs=0)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_fn", [tiny_qwen3, tiny_olmoe], ids=["qwen3", "olmoe"])
def test_trainer_resume_is_bit_for_bit(tmp_path, model_fn):
    whole, whole_opt, whole_losses = train(tmp_path / "whole", model_fn, "symmetric", STEPS)
    _, half_opt, first = train(tmp_path / "halves", model_fn, "symmetric", STEPS // 2, save=True)
    ckpt = tmp_path / "halves" / f"checkpoint-{STEPS // 2}"
    # transformers' Trainer reloads weights with a plain load_state_dict, which misses the fused expert
    # tensors save_pretrained wrote per expert (OLMoE): start the resumed run from_pretrained, as the
    # README says; a dense model needs no such step, but it does no harm.
    model = type(whole).from_pretrained(ckpt)
    resumed, opt, second = train(tmp_path / "halves", model_fn, "symmetric", STEPS, save=True, resume=str(ckpt), model=model)
    assert opt.num_steps == whole_opt.num_steps == STEPS  # restored from the checkpoint, then 4 more
    assert first == whole_losses[:STEPS // 2]
    assert second == whole_losses  # the resumed Trainer's log holds the first half, restored, and the second
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert_same_state(whole_opt, opt)
