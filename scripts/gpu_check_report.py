"""The one JSON file of scripts/gpu_check.sh: its phases, the gpu tests' results, the benchmark figures
and the issue's goals checked against them; prints a summary and exits 1 when anything failed.

    python scripts/gpu_check_report.py WORK_DIR OUT.json [--smoke]

Goals (figures from bench.py's training and inference tables, eager PEFT the reference):
compiled visionlora step <= 0.8 x PEFT's eager step; eager <= 1.0 x; peak CUDA memory no higher than
PEFT's; merged inference as fast as the base model (ratio <= 1.05). A goal reads null where its
figure is missing (no CUDA: no peak memory; a phase that failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

GOALS = {"compiled_vs_peft_eager": 0.8, "eager_vs_peft_eager": 1.0, "peak_vs_peft": 1.0, "merged_vs_base": 1.05}
PEFT_ROW = {"resnet": "peft", "unet": "peft (add_adapter)"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_summary(xml: Path) -> dict[str, Any]:
    """Counts from pytest's JUnit XML, with the names of the tests that failed."""
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_passed": ["no results (see the tests phase)"]}
    cases = list(root.iter("testcase"))
    not_passed, skipped = [], 0
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            not_passed.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
    return {
        "passed": len(cases) - len(not_passed) - skipped,
        "failed": len(not_passed),
        "skipped": skipped,
        "not_passed": not_passed,
    }


def goals(model: str, bench: dict[str, Any] | None) -> dict[str, Any]:
    """Each goal's measured ratio and whether it is met (None where the figure is missing)."""
    training = (bench or {}).get(f"{model}_training") or {}
    inference = (bench or {}).get(f"{model}_inference") or {}
    peft = training.get(PEFT_ROW[model], {})
    ours, compiled = training.get("visionlora", {}), training.get("visionlora, compiled", {})

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    measured = {
        "compiled_vs_peft_eager": ratio(compiled.get("step_s"), peft.get("step_s")),
        "eager_vs_peft_eager": ratio(ours.get("step_s"), peft.get("step_s")),
        "peak_vs_peft": ratio(ours.get("peak_mb"), peft.get("peak_mb")),
        "merged_vs_base": ratio(inference.get("visionlora merged"), inference.get("base")),
    }
    return {
        name: {"ratio": value, "goal": GOALS[name], "met": None if value is None else value <= GOALS[name]}
        for name, value in measured.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    phases = [json.loads(line) for line in (args.work / "phases.jsonl").read_text().splitlines() if line.strip()]
    benches = {model: _read_json(args.work / f"bench-{model}.json") for model in ("resnet", "unet")}
    device = next((b["device"] for b in benches.values() if b), None)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": device,
        "torch": next((b["torch"] for b in benches.values() if b), None),
        "python": platform.python_version(),
        "phases": phases,
        "tests": tests_summary(args.work / "tests.xml"),
        "goals": {model: goals(model, bench) for model, bench in benches.items()},
        "bench": benches,
    }
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)
    print(f"\ngpu check ({'smoke, ' if args.smoke else ''}{device}): wrote {args.out}")
    for phase in phases:
        print(f"  {phase['phase']}: exit {phase['rc']} in {phase['seconds']} s")
    tests = report["tests"]
    print(f"  tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
    for name in tests["not_passed"]:
        print(f"    not passed: {name}")
    for model, measured in report["goals"].items():
        cells = [
            f"{name} {g['ratio']:.3f} ({'met' if g['met'] else 'NOT met'})"
            for name, g in measured.items()
            if g["ratio"] is not None
        ]
        print(f"  {model}: {'; '.join(cells) or 'no figures'}")
    failed = any(p["rc"] != 0 for p in phases) or tests["failed"] > 0 or tests["passed"] == 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
