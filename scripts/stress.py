"""Stress run: SIGKILL visionlora's writers at random moments and feed NaN/Inf into training runs.

    python scripts/stress.py                              # 20 kills per writer, 3 killed trainings, 3+3 NaN runs
    python scripts/stress.py --kills 100 --trainings 10 --nan-runs 10 --seed 1 --json stress.json
    python scripts/stress.py --kills 5 --no-diffusers     # quick, without the UNet folder writer

Each writer (adapter file, merged file, PEFT folder, merged UNet folder, training checkpoints) writes
to one place over and over and is killed after a random (seeded) delay; the output must then load,
hold one write throughout, be no older than the last finished write, and no temporary file may sit
where outputs go. Killed training runs must resume from ``--resume latest``. NaN runs poison random
training passes: isolated ones must be skipped (the run makes all its steps and writes finite
weights), a streak must stop the run with a TrainingError whose named checkpoint resumes. Prints a
markdown table ending with ``lost files: N``, writes JSON, and exits 1 if any file was lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability import harness
from tests.train.conftest import digit_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per writer kind")
    parser.add_argument("--trainings", type=int, default=3, help="training runs killed, then resumed")
    parser.add_argument("--nan-runs", type=int, default=3, help="runs with isolated NaN steps; as many with a streak")
    parser.add_argument("--max-delay", type=float, default=0.25, help="seconds a writer runs before its kill, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diffusers", action="store_true", help="leave out the merged UNet folder writer")
    parser.add_argument("--json", type=Path, default=Path("stress.json"))
    args = parser.parse_args()
    logging.getLogger("visionlora").setLevel(logging.ERROR)  # the runs' skip and take-over warnings are expected
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    kinds = [k for k in harness.WRITERS if not (args.no_diffusers and "UNet" in k)]
    harness.context(() if args.no_diffusers else ("diffusers",))
    outcomes: list[harness.Outcome] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visionlora-stress-") as tmp:
        root = Path(tmp)
        for index, kind in enumerate(kinds):
            outcomes.append(harness.kill_writers(kind, root / f"w{index}", args.kills, rng, args.max_delay))
        data = digit_folder(root / "digits")
        if args.trainings:
            outcomes.append(harness.kill_training(root / "train", data, args.trainings, rng))
        for name, run in (("isolated", harness.isolated_nan_run), ("streak", harness.nan_streak_run)):
            merged: harness.Outcome | None = None
            for i in range(args.nan_runs):
                one = run(root / f"nan-{name}-{i}", data, rng)
                if merged is None:
                    merged = one
                else:
                    for key in ("attempts", "survived", "lost", "writes"):
                        setattr(merged, key, getattr(merged, key) + getattr(one, key))
                    merged.problems += one.problems
            if merged is not None:
                outcomes.append(merged)
    seconds = time.perf_counter() - started
    lost = sum(o.lost for o in outcomes)
    where = f"torch {torch.__version__}, {platform.platform()}"
    print(f"visionlora stress run: seed {args.seed}, {where}, {seconds:.0f} s\n")
    print("| writer / case | attempts | survived | lost files | writes or NaN steps | temp files left |")
    print("|---|---:|---:|---:|---:|---:|")
    for o in outcomes:
        print(f"| {o.kind} | {o.attempts} | {o.survived} | {o.lost} | {o.writes} | {o.leftovers} |")
    print(f"\nlost files: {lost}")
    for o in outcomes:
        for problem in o.problems[:3]:
            print(f"  {o.kind}: {problem}")
    report = {
        "seed": args.seed,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seconds": seconds,
        "lost": lost,
        "outcomes": [asdict(o) for o in outcomes],
    }
    args.json.write_text(json.dumps(report, indent=1))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
