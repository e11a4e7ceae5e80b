"""Reliability test set: resharding checkpoints, bad input, faults, property-based parity.

Runs the reliability tests with pytest ``--repeats`` times and writes what they reported: the
outcome counts (passed / failed / xfailed / xpassed / skipped / errors) per file and in total,
every test that did not pass with its reason, and the wall time of each run (median, min–max),
with the machine, the versions and the command. A ``## Notes (by hand)`` section already in the
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
import re
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
        odd = []
        for case in ET.parse(report).getroot().iter("testcase"):
            path = case.get("classname", "").split(".")
            file = next((f for f in files if f[:-3].replace("/", ".") == ".".join(path[:len(f[:-3].split("/"))])),
                        "other")
            kind, reason = outcome(case)
            per_file.setdefault(file, Counter())[kind] += 1
            if kind != "passed":
                odd.append((kind, f"{file}::{case.get('name')}", reason.splitlines()[0] if reason else ""))
    totals = sum(per_file.values(), Counter())
    counts = ", ".join(f"{totals[k]} {k}" for k in OUTCOMES if totals[k])
    return {"wall": wall, "per_file": per_file, "odd": odd, "summary": counts, "returncode": proc.returncode}


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
    same = all(r["per_file"] == first["per_file"] for r in runs)
    totals = sum(first["per_file"].values(), Counter())
    shown = [k for k in OUTCOMES if k in ("passed", "failed", "xfailed", "skipped") or totals[k]]
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/reliability.py"] + list(sys.argv[1:] if argv is None else argv))
    pytest_cmd = "python -m pytest -q " + " ".join(files)
    if args.examples is not None:
        pytest_cmd = f"DIST_SPECTRAL_PROPERTY_EXAMPLES={args.examples} " + pytest_cmd

    lines = [
        "# Reliability: checkpoints that reshard, bad input, faults, property-based parity",
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
