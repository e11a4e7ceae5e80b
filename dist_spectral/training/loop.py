"""The training loop: build, wrap, optimise, evaluate, log, checkpoint.

One step on every rank::

    x = batch(seed, step, rank)                       data.py: no loader state
    loss = model(input_ids=x, labels=x).loss          HF causal-LM cross-entropy, local mean
    loss.backward()                                   engine averages gradients over ranks
    [clip_grad_norm_]                                 optional; works on FSDP2 DTensors
    opt.step(); sched.step(); opt.zero_grad()         dist_spectral optimizer, paper_schedule

Under DeepSpeed (``parallel.engine=deepspeed``) the batch is cut into the gradient-accumulation
micro-batches and each goes through ``loss = engine(...)``, ``engine.backward(loss)``,
``engine.step()``: DeepSpeed averages and clips the gradients, calls the optimizer at the last
micro-batch (once per param group at ZeRO-1/2, per sub-group at ZeRO-3: the step's statistics
are summed over those calls) and then steps the scheduler. Checkpoints are DeepSpeed's
(``engine.save_checkpoint``: each rank writes its own partition of the optimizer state), so a
run resumes at the same world size and ZeRO stage.

Validation is the token-weighted mean cross-entropy over a fixed held-out set, at step 0, every
``eval_every`` steps and at the end. Checkpoints (``dist_spectral.checkpoint``) hold the model,
optimizer and scheduler; the step count is all the data needs to continue. They also record the
schedule's settings (``train.steps``, ``optim.warmup``, ``optim.constant_fraction``): a run resumed
with others follows the new schedule from the restored step (``dist_spectral/schedules.py``) and
says so in one line.
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import checkpoint, faults
from .config import RunConfig, dump
from .data import TokenData, load_tokens
from ..schedules import apply_schedule
from ..stats import StepStats
from .launchers import DistEnv, deepspeed_config, deepspeed_initialize, deepspeed_load, init_distributed, wrap_model
from .metrics import MetricsLog, plot_losses, read_metrics
from .shm import remove_own_buffer


def resolve_resume(resume: str, out: Path) -> Path:
    """``auto`` → the latest checkpoint of this run; a run directory → its latest; else the path itself.

    Only ``checkpoints/latest`` names a checkpoint: it is moved (atomically) after a save is complete,
    so a save interrupted by a crash, whose files sit in a ``step_NNNNNN.tmp-<id>`` directory, is never
    resumed from."""
    root = out if resume == "auto" else Path(resume)
    pointer = root / "checkpoints" / "latest"
    if pointer.is_file():
        path = root / "checkpoints" / pointer.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: {pointer} names {path.name}, which is not there "
                                    "(deleted by hand?): pass a checkpoint directory to --resume")
        return path
    if resume == "auto" or not root.exists():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {root if resume != 'auto' else pointer} "
                                "(a checkpoint directory, a run directory with checkpoints/latest, or no value for "
                                "this run's latest)")
    if checkpoint.TEMPORARY.fullmatch(root.name):
        raise ValueError(f"--resume {resume}: a save that never finished (or a replaced checkpoint); resume from "
                         f"{root.parent / 'latest'}'s checkpoint or another complete one")
    return root


def elastic_resume(resume: str | None, out: Path) -> str | None:
    """What a restarted elastic worker group resumes from: this job's latest checkpoint.

    ``torchrun --max-restarts=N`` restarts every worker with the same arguments after a failure
    (``TORCHELASTIC_RESTART_COUNT`` > 0). Starting again from scratch, or from the ``--resume`` the
    first attempt was given, would throw away the steps checkpointed since; so a restart continues
    from the run's latest checkpoint if this torchrun job saved it (``TORCHELASTIC_RUN_ID``, recorded
    in every checkpoint), and otherwise does what the first attempt was asked: an earlier job's
    checkpoint left in the same output directory is not this run's progress."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return resume
    try:
        latest = resolve_resume("auto", out)
    except FileNotFoundError:
        return resume
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return "auto" if job is not None and saved_by_job(latest) == job else resume


def saved_by_job(path: Path) -> str | None:
    """The ``TORCHELASTIC_RUN_ID`` of the job that saved a training-entry checkpoint (None: unknown)."""
    manifest = path / Trainer.MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("elastic_job")
    try:
        return (checkpoint.read_meta(path).get("extra") or {}).get("elastic_job")
    except (ValueError, FileNotFoundError):
        return None


def point_latest(root: Path, name: str) -> None:
    """Make ``root/latest`` name ``name`` in one step (``os.replace``: never empty or half written)."""
    tmp = root / f"latest.tmp-{os.getpid()}"
    tmp.write_text(name)
    os.replace(tmp, root / "latest")


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints up to the one ``root/latest`` names (0: none
    deleted). Only complete ``step_NNNNNN`` directories count; checkpoints after ``latest`` and
    temporaries of saves in flight are left alone, and nothing goes while ``latest`` names no
    checkpoint (so the only complete one is never deleted). Returns what went."""
    import re
    import shutil

    pointer = root / "latest"
    if keep <= 0 or not pointer.is_file():
        return []
    latest = pointer.read_text().strip()
    if not (root / latest).is_dir():
        return []
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)
                  and p.name <= latest)
    gone = done[:-keep]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def saved_layout(path: Path) -> str | None:
    """The layout a training-entry checkpoint was saved under (``fsdp x2``, ``deepspeed ZeRO-2 x2``),
    ``dcp`` / ``deepspeed`` when it predates the record, ``None`` when ``path`` is neither."""
    manifest = path / Trainer.MANIFEST
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        return f"deepspeed ZeRO-{saved['zero_stage']} x{saved['world_size']}"
    if (path / ".metadata").is_file():
        try:
            meta = checkpoint.read_meta(path)
        except ValueError:
            return None
        return (meta.get("extra") or {}).get("layout") or f"dcp x{meta.get('world_size')}"
    return None


def format_mismatch(path: Path, here: str, deepspeed: bool) -> str | None:
    """Why a checkpoint cannot resume under this run's layout ``here``, or ``None`` when it can.

    DCP checkpoints (``parallel=none|ddp|fsdp|hsdp|ep``) reshard to any of those layouts at any world
    size; DeepSpeed's hold each rank's flat ZeRO partition and resume only under DeepSpeed (the stage
    and world size are checked against its manifest when loading)."""
    saved = saved_layout(path)
    if saved is None or saved.startswith("deepspeed") == deepspeed:
        return None
    if deepspeed:
        return (f"checkpoint {path} was saved under {saved} (torch.distributed.checkpoint); this run is {here}. "
                "DeepSpeed resumes only its own checkpoints: resume this one with parallel=none, ddp, fsdp, hsdp "
                "or ep (any world size), or start the DeepSpeed run from scratch")
    return (f"checkpoint {path} was saved under {saved} (DeepSpeed's per-rank ZeRO partitions); this run is "
            f"{here}. Resume it with parallel.engine=deepspeed at the same ZeRO stage and world size; "
            "checkpoints of parallel=none, ddp, fsdp, hsdp and ep reshard between those layouts")


class Trainer:
    """State of one run on one rank (see the module docstring)."""

    def __init__(self, cfg: RunConfig, env: DistEnv):
        from .. import build_optimizer, paper_schedule
        from ..models import build_model, enable_activation_checkpointing

        self.cfg, self.env = cfg, env
        self.out = cfg.output
        self.is_main = env.rank == 0
        train, val, tok_vocab = load_tokens(cfg.data)
        # On meta: wrap_model allocates and initialises only this rank's shards (models.init_weights).
        model = build_model(cfg.model.preset, device="meta", dtype=cfg.model.dtype, **cfg.model.config)
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.vocab = model.config.get_text_config().vocab_size
        if tok_vocab > self.vocab:
            raise ValueError(f"the tokenizer {cfg.data.tokenizer!r} has {tok_vocab} tokens but the model "
                             f"{cfg.model.preset!r} only {self.vocab}: set model.config.vocab_size={tok_vocab}")
        self.n_params = sum(p.numel() for p in model.parameters())
        self.data = TokenData(train, val, cfg.data.seq_len, cfg.data.batch_size, env.world_size, cfg.train.seed,
                              self.vocab)
        self.model = wrap_model(model, cfg.parallel, env, seed=cfg.train.seed)
        o = cfg.optim
        self.opt = build_optimizer(self.model, o.recipe, nonfinite=o.nonfinite, bucket_mb=o.bucket_mb,
                                   comm_dtype=o.comm_dtype, replicate_below=o.replicate_below, **o.overrides)
        self.sched = paper_schedule(self.opt, cfg.train.steps, warmup=o.warmup, constant_fraction=o.constant_fraction)
        self.engine = None  # DeepSpeed's engine: it then runs backward and step, and is the model
        if cfg.parallel.engine == "deepspeed":
            self.ds_config = deepspeed_config(cfg.parallel, cfg.data.batch_size, env.world_size, o.clip_grad)
            self.engine = deepspeed_initialize(self.model, self.opt, self.sched, self.ds_config)
            self.model = self.engine
            self._calls = StepStats()
            self.opt.register_step_post_hook(lambda opt, args, kwargs: self._calls.add(opt.last_stats))
        self.schedule_note = None  # set by load() when the resumed run's schedule differs from the saved one
        self.hyper_note = None  # set by load() when this run's hyperparameters differ from the checkpoint's
        self.val = ([x.to(env.device) for x in self.data.val_batches(env.rank, cfg.train.eval_batches)]
                    if cfg.train.eval_every else [])

    # ----- pieces -----
    def mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(t)
            t /= self.env.world_size
        return t.tolist()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for x in self.val:
            logits = self.model(input_ids=x).logits
            total[0] += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                        reduction="sum").double()
            total[1] += x[:, 1:].numel()
        if self.env.world_size > 1:
            dist.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1])

    def save(self, step: int) -> Path:
        path = self.out / "checkpoints" / f"step_{step:06d}"
        if self.engine is not None:
            self.save_deepspeed(step, path)
            self._saved(path)
            return path
        extra = {"step": step, "name": self.cfg.name, "schedule": self.schedule_settings(), "layout": self.layout(),
                 "elastic_job": os.environ.get("TORCHELASTIC_RUN_ID")}
        if self.cfg.train.ckpt_async:
            self.finish_save()  # one write in flight at a time
            if self._ckpt_group is None:  # the writer thread's collectives get a group of their own
                self._ckpt_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
            # latest moves as soon as the checkpoint is complete (rank 0's writer thread), not at the next save
            self._pending = checkpoint.async_save(str(path), self.model, self.opt, self.sched, extra=extra,
                                                  process_group=self._ckpt_group,
                                                  when_complete=lambda: self._saved(path))
            return path
        checkpoint.save(str(path), self.model, self.opt, self.sched, extra=extra)
        self._saved(path)
        return path

    _pending, _ckpt_group = None, None  # the async save in flight (its future); its process group

    def finish_save(self) -> None:
        """Wait for the async save in flight, if any (rank 0: until ``latest`` names it and old ones are pruned)."""
        if self._pending is not None:
            future, self._pending = self._pending, None
            future.result()

    def _saved(self, path: Path) -> None:
        if self.is_main:  # rank 0 returns once the checkpoint is complete and renamed to ``path``
            point_latest(path.parent, path.name)
            prune_checkpoints(path.parent, self.cfg.train.ckpt_keep)

    def load(self, path: Path) -> int:
        error = format_mismatch(Path(path), self.layout(), self.engine is not None)
        if error:
            raise ValueError(error)
        configured = [hyperparameters(g) for g in self.opt.param_groups], list(self.sched.base_lrs)
        extra = (self.load_deepspeed(path) if self.engine is not None
                 else checkpoint.load(str(path), self.model, self.opt, self.sched))
        step = int(extra["step"])
        if not 0 <= step <= self.cfg.train.steps:
            raise ValueError(f"checkpoint {path} is at step {step}, outside this run's 0..{self.cfg.train.steps}")
        # The groups hold the lrs saved under the checkpoint's schedule; continue on this run's.
        self.schedule_note = schedule_change(extra.get("schedule"), self.schedule_settings(), step,
                                             self.opt.param_groups, self.sched.base_lrs, apply_schedule(self.sched))
        # Loading restored the checkpoint's hyperparameters (torch's convention); this run's config
        # is what the user asked for, so its values apply, and the change is said.
        self.hyper_note = restore_configured(self.opt.param_groups, self.sched, *configured)
        return step

    def schedule_settings(self) -> dict:
        """What the lr schedule is a function of, besides the step (saved with every checkpoint)."""
        o = self.cfg.optim
        return {"train.steps": self.cfg.train.steps, "optim.warmup": o.warmup, "optim.constant_fraction": o.constant_fraction}

    def layout(self) -> str:
        """The engine and world size, e.g. ``fsdp x2`` or ``deepspeed ZeRO-2 x2`` (a metrics segment's label)."""
        engine = self.cfg.parallel.engine
        if self.engine is not None:
            engine += f" ZeRO-{self.ds_config['zero_optimization']['stage']}"
        elif engine == "hsdp":
            engine += f" {self.cfg.parallel.replicas} replicas"
        return f"{engine} x{self.env.world_size}"

    # ----- DeepSpeed -----
    MANIFEST = "dist_spectral.json"  # beside DeepSpeed's files: what a resume must match

    def save_deepspeed(self, step: int, path: Path) -> Path:
        """Every rank writes its ZeRO partition (our optimizer's ``state_dict``), rank 0 the model
        states (scheduler included), into a temporary sibling of ``path`` that rank 0 renames once
        all are written (``checkpoint.staging_dir``/``publish``); the caller then moves ``latest``."""
        counters = {"num_steps": self.opt.num_steps, "skipped_steps": self.opt.skipped_steps,
                    "total_polar_flops": self.opt.total_polar_flops}  # one key: DeepSpeed keeps "skipped_steps"
        staging = checkpoint.staging_dir(path)
        self._ds_saves += 1
        with self._deepspeed_kill_hook(self._ds_saves):
            # save_latest=False: DeepSpeed would write checkpoints/latest itself, naming the temporary
            self.engine.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False,
                                        client_state={"step": step, "name": self.cfg.name,
                                                      "optimizer_counters": counters,
                                                      "schedule": self.schedule_settings()})
        if self.is_main:
            manifest = {"step": step, "world_size": self.env.world_size,
                        "elastic_job": os.environ.get("TORCHELASTIC_RUN_ID"),
                        "zero_stage": self.engine.zero_optimization_stage(), "recipe": self.cfg.optim.recipe}
            (staging / self.MANIFEST).write_text(json.dumps(manifest, indent=1))
        dist.barrier()  # every rank's partition is written
        if self.is_main:
            checkpoint.publish(staging, path)
        return path

    _ds_saves = 0

    def _deepspeed_kill_hook(self, n: int):
        """The fault tests' kill inside DeepSpeed's n-th save, after this rank's first file (faults.py)."""
        import contextlib

        engine = self.engine.checkpoint_engine
        if not faults.armed():
            return contextlib.nullcontext()
        save, first = engine.save, [True]

        def hooked(state_dict, path, *args, **kwargs):
            out = save(state_dict, path, *args, **kwargs)
            if first[0]:
                first[0] = False
                faults.kill_point("save", n)
            return out

        @contextlib.contextmanager
        def patched():
            engine.save = hooked
            try:
                yield
            finally:
                engine.save = save
        return patched()

    def load_deepspeed(self, path: Path) -> dict:
        manifest_path = path / self.MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint of the training entry point (no {self.MANIFEST})")
        saved = json.loads(manifest_path.read_text())
        here = {"world_size": self.env.world_size, "zero_stage": self.engine.zero_optimization_stage()}
        if any(saved[k] != v for k, v in here.items()):
            raise ValueError(f"{path} was saved at world size {saved['world_size']}, ZeRO-{saved['zero_stage']}; this run "
                             f"is at world size {here['world_size']}, ZeRO-{here['zero_stage']}. DeepSpeed checkpoints "
                             "hold each rank's flat partition of the optimizer state: resume with the same number of "
                             "processes and stage")
        extra = deepspeed_load(self.engine, self.opt, str(path.parent), path.name)
        for key, value in extra["optimizer_counters"].items():
            setattr(self.opt, key, value)
        return extra

    def deepspeed_step(self, x: torch.Tensor) -> tuple[float, StepStats]:
        """One optimizer step through the engine; returns the mean micro-batch loss and the
        optimizer's statistics summed over DeepSpeed's step() calls."""
        self._calls = StepStats()
        engine_skipped = self.engine.skipped_steps
        losses = []
        for micro in x.chunk(self.engine.gradient_accumulation_steps()):
            loss = self.engine(input_ids=micro, labels=micro).loss
            self.engine.backward(loss)
            self.engine.step()  # at the last micro-batch: clip, optimizer, scheduler, zero the gradients
            losses.append(loss.item())
        # DeepSpeed's own skip (fp16 overflow, non-finite global norm) never calls the optimizer
        self._calls.skipped |= self.engine.skipped_steps > engine_skipped
        return sum(losses) / len(losses), self._calls

    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient, resumed runs' earlier ones included: the
        optimizer's own (``opt.skipped_steps``) plus, under DeepSpeed, the engine's (``engine.skipped_steps``:
        steps DeepSpeed skipped without calling the optimizer). A step is skipped by one or the other,
        so the sum counts each once; both counters are checkpointed."""
        return self.opt.skipped_steps + (self.engine.skipped_steps if self.engine is not None else 0)

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        x = self.data.train_batch(step, self.env.rank).to(self.env.device)
        lrs = {g["name"]: g["lr"] for g in self.opt.param_groups}
        if self.engine is not None:
            loss_value, s = self.deepspeed_step(x)
        else:
            loss = self.model(input_ids=x, labels=x).loss
            loss.backward()
            if self.cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
            self.opt.step()
            if not self.opt.last_stats.skipped:  # a skipped step (non-finite gradient) leaves the schedule too
                self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            loss_value, s = loss.item(), self.opt.last_stats
        local = [loss_value, s.step_seconds, s.exchange_seconds, s.compute_seconds, time.perf_counter() - t0]
        loss_v, opt_s, exch_s, comp_s, step_s = self.mean_over_ranks(local)
        return {"kind": "train", "step": step + 1, "loss": loss_v, "lr": lrs, "tokens": self.data.tokens_per_step,
                "tokens_per_s": self.data.tokens_per_step / step_s, "step_s": step_s, "opt_s": opt_s,
                "exchange_s": exch_s, "compute_s": comp_s, "skipped": int(s.skipped)}

    # ----- the run -----
    def header(self) -> str:
        c, e = self.cfg, self.env
        engine = c.parallel.engine
        if self.engine is not None:
            engine += (f" ZeRO-{self.ds_config['zero_optimization']['stage']}"
                       + (" bf16" if self.ds_config["bf16"]["enabled"] else "")
                       + f", {self.ds_config['gradient_accumulation_steps']} micro-batch(es)/step")
        lines = [f"run {c.name!r} -> {self.out}",
                 f"model {c.model.preset} ({self.n_params / 1e6:.2f}M params), recipe {c.optim.recipe}, engine "
                 f"{engine} x{e.world_size} ({e.backend}, {e.device}, {torch.get_num_threads()} threads/rank)",
                 f"data {c.data.source}: {len(self.data.train):,} train / {len(self.data.val):,} val tokens; "
                 f"{c.data.batch_size} x {c.data.seq_len} per rank = {self.data.tokens_per_step:,} tokens/step, "
                 f"{c.train.steps} steps"]
        return "\n".join(lines + [f"note: {line}" for line in getattr(self.opt, "report", [])])

    def run(self, resume: str | None = None) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        start = self.load(resolve_resume(resume, self.out)) if resume else 0
        metrics = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(f"# resolved config of run {cfg.name}\n" + dump(cfg))
            metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=start if resume else None)
            restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
            print(self.header() + (f"\nresumed at step {start}" if resume else "")
                  + (f" (elastic restart {restart})" if restart and resume else "")
                  + (f"\n{self.schedule_note}" if self.schedule_note else "")
                  + (f"\n{self.hyper_note}" if self.hyper_note else ""), flush=True)
            metrics.write({"kind": "segment", "step": start, "layout": self.layout(), "engine": cfg.parallel.engine,
                           "world_size": self.env.world_size})
        write = metrics.write if metrics else (lambda record: None)
        # On resume, rank 0's summary covers the whole run: earlier evals come from the kept metrics.
        evals = [(r["step"], r["val_loss"]) for r in read_metrics(metrics.path) if r["kind"] == "eval"] if metrics else []
        if cfg.train.eval_every and start == 0:
            evals.append((0, self.evaluate()))
            write({"kind": "eval", "step": 0, "val_loss": evals[-1][1]})
        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (self.is_main and cfg.train.progress))
        records = []
        t_run = time.perf_counter()
        for step in range(start, cfg.train.steps):
            rec = self.train_step(step)
            records.append(rec)
            write(rec)
            done = step + 1
            if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                evals.append((done, self.evaluate()))
                write({"kind": "eval", "step": done, "val_loss": evals[-1][1]})
                if self.is_main:
                    bar.write(f"step {done:>6} | val {evals[-1][1]:.4f} | train {rec['loss']:.4f} | "
                              f"{optimizer_times(rec)} | {rec['tokens_per_s']:,.0f} tok/s")
            if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or (cfg.train.ckpt_final and done == cfg.train.steps):
                self.save(done)
            faults.kill_point("step", done)
            postfix = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:,.0f}"}
            if evals:
                postfix["val"] = f"{evals[-1][1]:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if not math.isfinite(rec["loss"]) and self.is_main:
                bar.write(f"warning: non-finite training loss at step {done}")
        bar.close()
        self.finish_save()
        summary = self.summary(records, evals, time.perf_counter() - t_run, start)
        if self.is_main:
            write(summary)
            if cfg.train.plot:
                plot_losses(self.out / "metrics.jsonl", self.out / "loss.png",
                            f"{cfg.name}: {cfg.model.preset}, {cfg.optim.recipe}", layout=self.layout())
            print(self.describe(summary), flush=True)
        return summary

    def summary(self, records: list[dict], evals: list[tuple], seconds: float, start: int) -> dict:
        warm = records[1:] or records  # the first step builds plans and warms caches
        mean = lambda key: sum(r[key] for r in warm) / max(1, len(warm))  # noqa: E731
        return {"kind": "summary", "step": self.cfg.train.steps, "start_step": start, "seconds": seconds,
                "final_loss": records[-1]["loss"] if records else None,
                "val_first": evals[0][1] if evals else None, "val_last": evals[-1][1] if evals else None,
                "tokens_per_s": mean("tokens_per_s"), "step_s": mean("step_s"), "opt_s": mean("opt_s"),
                "exchange_s": mean("exchange_s"), "compute_s": mean("compute_s"),
                "skipped_steps": self.skipped_steps(), "world_size": self.env.world_size}

    def describe(self, s: dict) -> str:
        if s["final_loss"] is None:
            return f"nothing to do: the run is already at step {s['step']} (raise train.steps to continue it)"
        val = (f"val loss {s['val_first']:.4f} -> {s['val_last']:.4f}" if s["val_first"] is not None else "no validation")
        return (f"done: {s['step'] - s['start_step']} steps in {s['seconds']:.1f} s, {s['tokens_per_s']:,.0f} tok/s; "
                f"{val}; final train loss {s['final_loss']:.4f}\n{optimizer_times(s)} per step of "
                f"{1e3 * s['step_s']:.1f} ms; skipped steps {s['skipped_steps']}\noutputs: {self.out}/metrics.jsonl"
                + (f", {self.out}/loss.png" if self.cfg.train.plot else ""))


def optimizer_times(r: dict) -> str:
    """``optimizer 42.2 ms (exchange 0.7, polar and matrix rules 22.3, other 19.2: ...)`` from a train
    or summary record. ``StepStats`` times the exchange (packing, collectives, unpacking) and the
    whole-matrix rules; the rest of ``step()`` is named by what it does rather than left unexplained."""
    other = max(0.0, r["opt_s"] - r["exchange_s"] - r["compute_s"])
    return (f"optimizer {1e3 * r['opt_s']:.1f} ms (exchange {1e3 * r['exchange_s']:.1f}, whole-matrix rules "
            f"{1e3 * r['compute_s']:.1f}, other {1e3 * other:.1f}: element-wise and row rules, non-finite check, "
            "parameter update, bookkeeping)")


def schedule_change(saved: dict | None, now: dict, step: int, groups: list[dict], base_lrs: list[float],
                    changes: list[tuple[float, float]]) -> str | None:
    """One line saying how a resume changes the lr schedule, or None when it does not.

    Args:
        saved (dict | None): the checkpoint's schedule settings (None: saved before they were recorded).
        now (dict): this run's (:meth:`Trainer.schedule_settings`).
        step (int): the restored step.
        groups (list of dict): the optimizer's param groups (their ``schedule`` shape and ``name``).
        base_lrs (list of float): the scheduler's base lrs, in group order.
        changes (list of (float, float)): :func:`dist_spectral.schedules.apply_schedule`'s result.
    """
    moved = [c for c in changes if c[0] != c[1]]
    differ = {k: (saved[k], v) for k, v in now.items() if saved is not None and saved.get(k) != v}
    if not moved and not differ:
        return None
    what = (", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items()) if differ
            else "the checkpoint's lrs are not this run's schedule's")
    per_shape = {}
    for g, base, (before, after) in zip(groups, base_lrs, changes):
        if base and g.get("schedule", "matrix") not in per_shape:
            per_shape[g.get("schedule", "matrix")] = f"x{before / base:.3f} -> x{after / base:.3f}"
    ratios = ", ".join(f"{shape} groups {r}" for shape, r in per_shape.items())
    return (f"schedule changed on resume ({what}): the lr follows this run's schedule over {now['train.steps']} steps "
            f"from step {step} on, as if the run had been planned that long; lr at step {step + 1} "
            f"(of the base lr): {ratios}")


#: param-group keys that are not hyperparameters a config sets: the lr is the schedule's (its base is
#: compared); a changed rule or membership is a mismatch the checkpoint load refuses
_NOT_HYPER = ("params", "lr", "initial_lr", "name", "rule", "param_names")


def hyperparameters(group: dict) -> dict:
    """A param group's hyperparameters as this run's config set them (sequences as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k not in _NOT_HYPER}


def restore_configured(groups: list[dict], scheduler, configured: list[dict], base_lrs: list[float]) -> str | None:
    """Put this run's hyperparameters back into ``groups`` after a checkpoint load restored the
    saved ones, and this run's base lrs into ``scheduler`` (the lr then follows this run's
    schedule from its base); one line naming what changed, or None.

    Args:
        groups (list of dict): the optimizer's param groups, as loaded.
        scheduler (LambdaLR): the scheduler, as loaded.
        configured (list of dict): :func:`hyperparameters` of each group before the load.
        base_lrs (list of float): the scheduler's base lrs before the load (this run's).
    """
    changed = []
    for i, (group, want) in enumerate(zip(groups, configured, strict=True)):
        name = group.get("name", f"group {i}")
        have = hyperparameters(group)
        for key in sorted(want):
            if have.get(key) != want[key]:
                changed.append(f"{name} {key} {have.get(key)!r} -> {want[key]!r}")
                group[key] = list(want[key]) if isinstance(group.get(key), list) else want[key]
        saved_base = scheduler.base_lrs[i]
        if saved_base != base_lrs[i]:
            changed.append(f"{name} lr {saved_base:g} -> {base_lrs[i]:g}")
            scheduler.base_lrs[i] = base_lrs[i]
            group["initial_lr"] = base_lrs[i]
    if not changed:
        return None
    apply_schedule(scheduler)
    return ("hyperparameters differ from the checkpoint's, this run's apply from here on: " + "; ".join(changed))


def train(cfg: RunConfig, resume: str | None = None) -> dict:
    """Run ``cfg`` on this process (under torchrun, or alone as a world of one); returns the summary."""
    env = init_distributed(cfg.parallel)
    resume = elastic_resume(resume, cfg.output)
    try:
        return Trainer(cfg, env).run(resume)
    finally:
        # DeepSpeed's engine sits in reference cycles that still hold its process groups; free them
        # while the interpreter is whole, so the groups are not torn down during finalisation.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        if cfg.parallel.engine == "deepspeed":
            remove_own_buffer()


__all__ = ["Trainer", "train", "resolve_resume", "elastic_resume", "prune_checkpoints", "format_mismatch",
           "optimizer_times", "schedule_change", "hyperparameters", "restore_configured"]
