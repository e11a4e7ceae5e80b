"""Reliability test set: every fault and bad input tried, the engine and W, and what happened.

Runs the reliability tests with pytest ``--repeats`` times and writes, from pytest's JUnit report
of the first run: a table of every fault and bad input tried (class × case), the engines and world
sizes it was tried under and what happened (survived with nothing lost / clear error / failed),
then the outcome counts per file, every test that did not pass with its reason, and the wall time
of each run (median, min–max), with the machine, the versions and the command.

What each test tries is read from its id by :data:`CASES` (file, test function) -> a function of
the test's parameter id; what happened is the test's outcome: a passing test asserted its kind
(its state equal to the uninterrupted run's, or its error's message), a failing one is "failed".
Every test the run reported must map (and every entry of the table be used), or the script stops
naming the tests to add. A ``## Notes (by hand)`` section already in the
output file is kept (see ``common.write_results``).

    python benchmarks/reliability.py                      # 3 runs, writes results/reliability.md
    python benchmarks/reliability.py --repeats 1 --out /tmp/reliability.md
    python benchmarks/reliability.py --examples 800       # longer property search (test_properties)

Each pytest run is a fresh process, so every run pays the same start-up (imports, forked process
groups); the counts must be the same in every run, and the script says so when they are not.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_lines, summary, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The reliability test set: what each file checks.
TESTS = {
    "tests/distributed/test_checkpoint.py": "DCP and one-file checkpoints saved at W, resumed at W' (FSDP2, DDP, "
                                            "HSDP), compared with uninterrupted runs and the reference",
    "tests/distributed/test_faults.py": "non-finite gradients (skip / raise), ranks that disagree, unusable layouts, "
                                        "a dead and a stalled rank in a real FSDP2 run, resume after the fault",
    "tests/distributed/test_properties.py": "Hypothesis: random (world size, layout, role, rule, gradient) cases, "
                                            "distributed step against the reference",
    "tests/unit/test_errors.py": "configuration errors: each message, and the model left untouched",
    "tests/distributed/test_atomic_checkpoint.py": "a save SIGKILLed on one rank (sync, async): the previous "
                                                   "checkpoint stays loadable and resumes bit for bit",
    "tests/e2e/test_elastic.py": "torchrun --max-restarts=2: ranks SIGKILLed inside and between saves; restarts "
                                 "resume and end equal to an uninterrupted run (FSDP2, DeepSpeed ZeRO-2)",
    "tests/distributed/test_deepspeed_nonfinite.py": "NaN / Inf in the first, a middle or the last DeepSpeed group: "
                                                     "the whole step skipped, nothing changed",
    "tests/distributed/test_resume_layouts.py": "a training checkpoint saved under FSDP2 resumed under EP, HSDP and "
                                                "one process; DCP and DeepSpeed checkpoints refuse each other",
}

SURVIVED, ERROR, CHECK, BASELINE = ("survived, nothing lost", "clear error", "holds (valid input, no fault)",
                                    "no fault: the run the others are compared with")
ENGINES = {"none": "none (one process)", "fsdp": "FSDP2", "ddp": "DDP", "hsdp": "HSDP", "ep": "EP (FSDP-gathered)",
           "ep-all-to-all": "EP (token-routed)", "fsdp-async": "FSDP2 (async saves)",
           "deepspeed-zero2": "DeepSpeed ZeRO-2", "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2",
           "zero3_subgroups": "DeepSpeed ZeRO-3 (sub-groups)", "replicated": "replicated",
           "fsdp_dim1": "FSDP2 Shard(1)", "ep_fsdp": "EP x FSDP2"}


def _tagged(tag: str) -> tuple[str, str]:
    """``fsdp3`` -> (engine, W)."""
    return ENGINES.get(tag.rstrip("0123456789"), tag.rstrip("0123456789")), tag[len(tag.rstrip("0123456789")):]


def _resumed(param: str) -> tuple:
    fmt, saved, loaded = param.split("-")
    return ("resume at another W / engine", f"{fmt} saved {saved}, loaded {loaded}", *_tagged(loaded), SURVIVED)


def _property(param: str) -> tuple:
    world, layout, grad = param.split("-")[:3]
    return ("hard gradients (property-based)", f"{grad} gradients, random shapes, roles and rules",
            ENGINES.get(layout, layout), world[1:], SURVIVED)


def _ds_nonfinite(param: str) -> tuple:
    engine, where, value = param.split("-")
    return ("non-finite gradient", f"{value} in the {where} group on one rank, skip", ENGINES[engine], "2", SURVIVED)


#: Classes of fault and bad input, in the order the report lists them.
CLASSES = ("killed rank", "stalled rank", "elastic restart", "killed save", "non-finite gradient",
           "ranks that disagree", "unusable layout", "bad configuration", "mismatched checkpoint", "resume at another W / engine",
           "resume under another layout", "hard gradients (property-based)", "checkpoint contents", "no fault")
NO_GROUP = "(no process group)"

#: (file, test function) -> what the test tries: a function of its parameter id (the part between
#: the brackets, "" when none) giving (class, case, engine, W, what happens when it passes).
CASES = {
    ("tests/distributed/test_checkpoint.py", "test_resume_continues_the_uninterrupted_run"): _resumed,
    ("tests/distributed/test_checkpoint.py", "test_uninterrupted_runs_match_reference"):
        lambda p: ("no fault", "uninterrupted run against the reference", *_tagged(p), BASELINE),
    ("tests/distributed/test_checkpoint.py", "test_every_rank_saves_the_same_fqn_keys"):
        lambda p: ("checkpoint contents", "every rank saves the same keys", *_tagged(p), CHECK),
    ("tests/distributed/test_checkpoint.py", "test_checkpoint_holds_no_world_size_dependent_keys"):
        lambda p: ("checkpoint contents", "no key depends on W", "none; FSDP2; DDP; HSDP", "1-4", CHECK),
    ("tests/distributed/test_checkpoint.py", "test_mismatched_checkpoint_fails_on_every_rank"):
        lambda p: ("mismatched checkpoint", "another model's checkpoint, on every rank", "FSDP2", "2", ERROR),
    ("tests/distributed/test_checkpoint.py", "test_mismatched_load_raises_before_changing_anything"):
        lambda p: ("mismatched checkpoint", "{} ({})".format(*p.rsplit("-", 1)), ENGINES["none"], "1", ERROR),
    ("tests/distributed/test_checkpoint.py", "test_missing_checkpoint"):
        lambda p: ("mismatched checkpoint", "no checkpoint at the path", ENGINES["none"], "1", ERROR),
    ("tests/distributed/test_checkpoint.py", "test_state_dict_runs_no_fake_step"):
        lambda p: ("checkpoint contents", "state_dict runs no fake step", ENGINES["none"], "1", CHECK),
    ("tests/distributed/test_checkpoint.py", "test_scheduler_expected_but_not_saved"):
        lambda p: ("mismatched checkpoint", f"scheduler expected, none saved ({p})", ENGINES["none"], "1", ERROR),
    ("tests/distributed/test_faults.py", "test_uninterrupted_run_finishes"):
        lambda p: ("no fault", "uninterrupted training run", "FSDP2", "2", BASELINE),
    ("tests/distributed/test_faults.py", "test_dead_rank_survivor_names_step_and_collective"):
        lambda p: ("killed rank", "a rank exits inside optimizer step 5: the survivor", "FSDP2", "2", ERROR),
    ("tests/distributed/test_faults.py", "test_resume_after_the_fault_matches_the_uninterrupted_run"):
        lambda p: ("killed rank", "resume from the last checkpoint after it", "FSDP2", "2", SURVIVED),
    ("tests/distributed/test_faults.py", "test_stalled_rank_times_out"):
        lambda p: ("stalled rank", "a rank never joins step 3's collective", "FSDP2", "2", ERROR),
    ("tests/distributed/test_faults.py", "test_nonfinite_skip_is_collective_and_changes_nothing"):
        lambda p: ("non-finite gradient", "NaN on one rank, skip", "FSDP2", "2", SURVIVED),
    ("tests/distributed/test_faults.py", "test_nonfinite_raise_names_the_first_parameter_on_every_rank"):
        lambda p: ("non-finite gradient", "NaN on one rank, raise", "FSDP2", "2", ERROR),
    ("tests/distributed/test_faults.py", "test_ranks_with_different_parameters_all_raise"):
        lambda p: ("ranks that disagree", "a different model on each rank",
                   {"none": "replicated (no wrapper)", "fsdp": "FSDP2"}[p], "2", ERROR),
    ("tests/distributed/test_faults.py", "test_unsupported_layout_says_what_to_do"):
        lambda p: ("unusable layout", "a DTensor of partial sums (Partial())", "DTensor", "2", ERROR),
    ("tests/distributed/test_properties.py", "test_generated_enough_cases"):
        lambda p: ("hard gradients (property-based)", "enough distinct cases generated", NO_GROUP, "1-4", CHECK),
    ("tests/distributed/test_properties.py", "test_distributed_update_equals_reference"): _property,
    ("tests/unit/test_errors.py", "test_bad_configuration_raises_before_anything_changes"):
        lambda p: ("bad configuration", p, ENGINES["none"], "1", ERROR),
    ("tests/unit/test_errors.py", "test_role_prefixes_are_valid_selectors"):
        lambda p: ("bad configuration", "role prefixes accepted as selectors", ENGINES["none"], "1", CHECK),
    ("tests/unit/test_errors.py", "test_per_head_rule_on_a_matrix_without_heads_is_rejected"):
        lambda p: ("bad configuration", "per-head rule on a matrix without heads", ENGINES["none"], "1", ERROR),
    ("tests/unit/test_errors.py", "test_nonfinite_skip_changes_nothing_and_is_counted"):
        lambda p: ("non-finite gradient", f"{p}, skip", ENGINES["none"], "1", SURVIVED),
    ("tests/unit/test_errors.py", "test_nonfinite_raise_names_the_first_parameter"):
        lambda p: ("non-finite gradient", "nan, raise", ENGINES["none"], "1", ERROR),
    ("tests/unit/test_errors.py", "test_collective_error_names_step_collective_and_timeout"):
        lambda p: ("killed rank", "the collective error's message", NO_GROUP, "1", ERROR),
    ("tests/unit/test_errors.py", "test_timeout_option_reaches_topology_and_exchanges"):
        lambda p: ("stalled rank", "the timeout option reaches every collective", ENGINES["none"], "1", CHECK),
    ("tests/distributed/test_atomic_checkpoint.py", "test_killed_save_leaves_the_previous_checkpoint"):
        lambda p: ("killed save", f"a rank SIGKILLed during a save ({p}): the previous checkpoint is whole",
                   "FSDP2", "2", SURVIVED),
    ("tests/distributed/test_atomic_checkpoint.py", "test_resume_from_it_continues_bit_for_bit"):
        lambda p: ("killed save", f"{p} save killed: resume continues bit for bit", "FSDP2", "2", SURVIVED),
    ("tests/distributed/test_atomic_checkpoint.py", "test_next_save_deletes_the_stale_temporaries"):
        lambda p: ("killed save", f"{p} save killed: the next save removes its temporary", "FSDP2", "2", SURVIVED),
    ("tests/distributed/test_atomic_checkpoint.py", "test_prune_counts_only_complete_checkpoints"):
        lambda p: ("killed save", "keep-last-k counts only complete checkpoints", NO_GROUP, "1", SURVIVED),
    ("tests/distributed/test_atomic_checkpoint.py", "test_resume_ignores_temporaries_and_restarts_resume_this_jobs_latest"):
        lambda p: ("killed save", "resume never picks a temporary", NO_GROUP, "1", SURVIVED),
    ("tests/e2e/test_elastic.py", "test_restarts_resume_from_the_last_complete_checkpoint"):
        lambda p: ("elastic restart", "ranks SIGKILLed in and between saves: each restart resumes the last "
                   "complete checkpoint", ENGINES[p], "2", SURVIVED),
    ("tests/e2e/test_elastic.py", "test_final_checkpoint_equals_the_uninterrupted_run"):
        lambda p: ("elastic restart", "final checkpoint equals the uninterrupted run's", ENGINES[p], "2", SURVIVED),
    ("tests/e2e/test_elastic.py", "test_restarts_remove_the_killed_attempts_shared_memory"):
        lambda p: ("elastic restart", "the killed attempt's /dev/shm buffers removed", ENGINES[p], "2", SURVIVED),
    ("tests/distributed/test_deepspeed_nonfinite.py", "test_skip_is_whole_and_counted_once"): _ds_nonfinite,
    ("tests/distributed/test_deepspeed_nonfinite.py", "test_zero3_deepspeed_skips_before_the_optimizer"):
        lambda p: ("non-finite gradient", "{1} in the {0} group on one rank, skip".format(*p.split("-")),
                   "DeepSpeed ZeRO-3 (its own check)", "2", SURVIVED),
    ("tests/distributed/test_deepspeed_nonfinite.py", "test_raise_in_the_last_group_updates_nothing"):
        lambda p: ("non-finite gradient", "nan in the last group, raise", ENGINES["zero2"], "2", ERROR),
    ("tests/distributed/test_resume_layouts.py", "test_loaded_state_equals_the_saved_one"):
        lambda p: ("resume under another layout", "saved under FSDP2 at W=2: the loaded state", ENGINES[p],
                   "1" if p == "none" else "2", SURVIVED),
    ("tests/distributed/test_resume_layouts.py", "test_resumed_step_continues_the_uninterrupted_run"):
        lambda p: ("resume under another layout", "saved under FSDP2 at W=2: the next step", ENGINES[p],
                   "1" if p == "none" else "2", SURVIVED),
    ("tests/distributed/test_resume_layouts.py", "test_dcp_and_deepspeed_checkpoints_refuse_each_other_naming_the_layouts"):
        lambda p: ("resume under another layout", "a DCP checkpoint offered to DeepSpeed and back", "FSDP2; DeepSpeed",
                   "2", ERROR),
}

OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped", "error")
PACKAGES = ("transformers", "hypothesis", "pytest", "deepspeed")


def outcome(case: ET.Element) -> tuple[str, str]:
    """(outcome, reason) of one JUnit ``testcase``: pytest writes xfail as a skip of type pytest.xfail."""
    for child in case:
        if child.tag == "failure":
            return "failed", child.get("message", "")
        if child.tag == "error":
            return "error", child.get("message", "")
        if child.tag == "skipped":
            kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            return kind, child.get("message", "")
    # xpassed (non-strict) cases are reported as plain passes with a property; strict ones fail
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    return ("xpassed", props.get("xfail", "")) if "xfail" in props else ("passed", "")


def run_once(files: list[str], env: dict) -> dict:
    """One pytest run: wall seconds, outcomes per file, and the cases that did not pass."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if not os.path.exists(report):
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"pytest wrote no report (exit code {proc.returncode}); its output is above")
        per_file: dict[str, Counter] = {f: Counter() for f in files}
        odd, cases = [], []
        for case in ET.parse(report).getroot().iter("testcase"):
            path = case.get("classname", "").split(".")
            file = next((f for f in files if f[:-3].replace("/", ".") == ".".join(path[:len(f[:-3].split("/"))])),
                        "other")
            kind, reason = outcome(case)
            cases.append((file, case.get("name"), kind, reason))
            per_file.setdefault(file, Counter())[kind] += 1
            if kind != "passed":
                odd.append((kind, f"{file}::{case.get('name')}", reason.splitlines()[0] if reason else ""))
    totals = sum(per_file.values(), Counter())
    counts = ", ".join(f"{totals[k]} {k}" for k in OUTCOMES if totals[k])
    return {"wall": wall, "per_file": per_file, "odd": odd, "summary": counts, "returncode": proc.returncode,
            "cases": cases}


def tried(cases: list[tuple]) -> list[tuple]:
    """Each reported test as (class, case, engine, W, what happened, file::name), by :data:`CASES`.
    Stops naming the tests the table does not map, and the entries no test used."""
    rows, unmapped, used = [], [], set()
    for file, name, kind, reason in cases:
        function, _, param = name.partition("[")
        describe = CASES.get((file, function))
        if describe is None:
            unmapped.append(f"{file}::{name}")
            continue
        used.add((file, function))
        klass, case, engine, world, expected = describe(param[:-1] if param else "")
        if kind == "passed":
            happened = expected
        elif kind in ("failed", "error"):
            happened = "failed: " + (reason.splitlines()[0][:120] if reason else kind)
        else:
            happened = f"not run ({kind})"
        rows.append((klass, case, engine, world, happened, f"{file}::{name}"))
    stale = sorted(f"{f}::{fn}" for f, fn in set(CASES) - used if f in {c[0] for c in cases})
    if unmapped or stale:
        wrong = ([f"add {unmapped}"] if unmapped else []) + ([f"remove {stale}"] if stale else [])
        raise SystemExit("benchmarks/reliability.py CASES does not match the tests run: " + "; ".join(wrong))
    return rows


def tried_table(rows: list[tuple]) -> list[str]:
    """One line per (class, case, what happened): the engines and world sizes it ran under, and how
    many tests tried it."""
    groups: dict[tuple, list] = {}
    for klass, case, engine, world, happened, _ in rows:
        groups.setdefault((klass, case, happened), []).append((engine, world))
    order = {k: i for i, k in enumerate(CLASSES)}
    lines = ["| class | case | engine | W | what happened | tests |", "|---|---|---|---|---|---|"]
    for (klass, case, happened), where in sorted(groups.items(), key=lambda g: order[g[0][0]]):
        engines = "; ".join(sorted(set(e for e, _ in where)))
        worlds = ", ".join(sorted(set(w for _, w in where), key=lambda w: (len(w), w)))
        shown = f"**{happened}**" if happened.startswith(("failed", "not run")) else happened
        lines.append(f"| {klass} | {case} | {engines} | {worlds} | {shown} | {len(where)} |")
    return lines


def versions() -> str:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="pytest runs (default: 3)")
    parser.add_argument("--examples", type=int, default=None,
                        help="DIST_SPECTRAL_PROPERTY_EXAMPLES for test_properties.py (default: the test's own, 160)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "reliability.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: give at least 1")
    files = list(TESTS)
    missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
    if missing:
        raise SystemExit(f"reliability test files not found: {missing}; update TESTS in benchmarks/reliability.py")
    env = dict(os.environ)
    if args.examples is not None:
        env["DIST_SPECTRAL_PROPERTY_EXAMPLES"] = str(args.examples)

    start = datetime.datetime.now().replace(microsecond=0)
    machine = machine_lines()  # before the runs: its load average is the one at the start
    load0 = os.getloadavg()
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(files, env))
        print(f"run {i + 1}/{args.repeats}: {runs[-1]['wall']:.1f} s, {runs[-1]['summary']}", flush=True)
    load1 = os.getloadavg()

    first = runs[0]
    rows = tried(first["cases"])
    same = all(r["per_file"] == first["per_file"] for r in runs)
    totals = sum(first["per_file"].values(), Counter())
    shown = [k for k in OUTCOMES if k in ("passed", "failed", "xfailed", "skipped") or totals[k]]
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/reliability.py"] + list(sys.argv[1:] if argv is None else argv))
    pytest_cmd = "python -m pytest -q " + " ".join(files)
    if args.examples is not None:
        pytest_cmd = f"DIST_SPECTRAL_PROPERTY_EXAMPLES={args.examples} " + pytest_cmd

    happened = Counter(r[4] if not r[4].startswith("failed") else "failed" for r in rows)
    lines = [
        "# Reliability: every fault and bad input tried, and what happened",
        "",
        f"Command: `{command}` (each run: `{pytest_cmd}`)",
        "",
        f"Date: {start.isoformat()}; {args.repeats} run{'s' if args.repeats > 1 else ''}",
        "",
        "Machine:",
        "",
        *machine,
        f"- {versions()}",
        f"- load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load0)} at the start; "
        f"{', '.join(f'{x:.2f}' for x in load1)} at the end",
        "",
        "## What was tried and what happened",
        "",
        "From the first run's JUnit report: each test's id mapped to what it tries by `CASES` in "
        "benchmarks/reliability.py; what happened is the test's outcome (a passing test asserted it: "
        "state equal to the uninterrupted run's or the reference's, or the error's message; a failing one "
        "is *failed*). " + ", ".join(f"{n} {k}" for k, n in happened.most_common()) + ".",
        "",
        *tried_table(rows),
        "",
        "## Result",
        "",
        f"**{sum(totals.values())} tests: " + ", ".join(f"{totals[k]} {k}" for k in shown) + "**"
        + ("" if same else " in the first run; the counts differed between runs (see Per run)"),
        "",
        f"Wall time per run (pytest process, start-up included): {summary([r['wall'] for r in runs], '.1f')} s"
        + (f", median (min–max) of {args.repeats} runs" if args.repeats > 1 else " (one run)"),
        "",
        "| file | what it checks | " + " | ".join(shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for f in files:
        c = first["per_file"].get(f, Counter())
        lines.append(f"| `{f}` | {TESTS[f]} | " + " | ".join(str(c[k]) for k in shown) + " |")
    lines += ["", "Per run:", ""]
    lines += [f"{i + 1}. {r['summary']} in {r['wall']:.1f} s" for i, r in enumerate(runs)]
    lines += ["", "## Tests that did not pass", ""]
    odd = sorted(set(o for r in runs for o in r["odd"]))
    if odd:
        lines += [f"- {kind}: `{name}`" + (f": {reason}" if reason else "") for kind, name, reason in odd]
    else:
        lines.append("None: every test passed in every run.")
    write_results(args.out, lines)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
