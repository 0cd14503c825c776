"""Fuzz visionlora's adapter readers for a fixed time: mutated files of every format, loaded and inspected.

Runs the mutators of ``tests/io/adapter_mutations.py`` (the ones ``tests/io/test_fuzz.py`` drives
with Hypothesis) with ``random.Random`` choices, taking the formats in turn: native visionlora
files (TinyNet with grouped/dilated/depthwise convs, BatchNorm buffers and a trained head, and
FuzzNet with the shared layout), PEFT folders, diffusers files (FuzzNet and a tiny UNet) and kohya
LoRA/LoCon files (with and without visionlora's record, LyCORIS Tucker convs, UNet names). Each
mutated file goes through ``vl.load_adapter`` on a fresh model (a quarter of the time one that
already holds an adapter) and ``visionlora inspect``.

A case passes when both succeed or raise a visionlora error, a refused load leaves the model bit
for bit as it was, and a successful one leaves no NaN/Inf in it. Anything else counts under
"other" and is saved to ``--failures`` (files plus the mutation log) to reproduce; the exit status
is 1 if there was any.

Run::

    python scripts/fuzz.py --seconds 60
    python scripts/fuzz.py --seconds 600 --seed 7 --json fuzz.json --failures /tmp/fuzz-failures

Prints a markdown table (format, files fuzzed, loaded, refused, other) and writes JSON with the
counts, the torch version and the failing cases.
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
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tests.io.adapter_mutations import FORMATS, RandomChooser, choice, materialize, mutate, run_case, seeds_of


def fuzz(seconds: float, seed: int, failures: Path | None) -> tuple[dict[str, dict[str, int]], list[dict[str, str]]]:
    """Counts per format (fuzzed / loaded / refused / other) and the failing cases."""
    counts = {f: {"fuzzed": 0, "loaded": 0, "refused": 0, "other": 0} for f in FORMATS}
    failed: list[dict[str, str]] = []
    by_format = {f: seeds_of(f) for f in FORMATS}  # built before the clock starts
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    case = 0
    with tempfile.TemporaryDirectory(prefix="visionlora-fuzz-") as tmp:
        while time.monotonic() < deadline:
            fmt = FORMATS[case % len(FORMATS)]
            case += 1
            chooser = RandomChooser(rng)
            seed_file = choice(chooser, by_format[fmt])
            files, log = mutate(seed_file, chooser)
            preload = chooser.integer(0, 3) == 0
            counts[fmt]["fuzzed"] += 1
            try:
                counts[fmt][run_case(seed_file, files, Path(tmp), preload=preload)] += 1
            except Exception as exc:  # the point of the script: count and keep anything unexpected
                counts[fmt]["other"] += 1
                failure = {
                    "format": fmt,
                    "seed": seed_file.name,
                    "preload": str(preload),
                    "mutations": "; ".join(log),
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
                failed.append(failure)
                if failures is not None:
                    where = failures / f"case-{len(failed):04d}"
                    materialize(files, where)
                    (where / "case.json").write_text(json.dumps({**failure, "entry": seed_file.entry}, indent=1))
    return counts, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, help="also write the counts and failures here")
    parser.add_argument("--failures", type=Path, help="save each failing case's files to a folder here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torch's casting warnings on purpose-made bad tensors
    logging.getLogger("visionlora").setLevel(logging.WARNING)
    started = time.monotonic()
    counts, failed = fuzz(args.seconds, args.seed, args.failures)
    elapsed = time.monotonic() - started
    machine = platform.processor() or platform.machine()
    print(f"visionlora fuzz: {args.seconds:g} s, seed {args.seed}, torch {torch.__version__}, {machine}\n")
    print("| format | files fuzzed | loaded OK | refused (visionlora error) | other exceptions |")
    print("|---|---:|---:|---:|---:|")
    for fmt, c in counts.items():
        print(f"| {fmt} | {c['fuzzed']} | {c['loaded']} | {c['refused']} | {c['other']} |")
    total = {k: sum(c[k] for c in counts.values()) for k in ("fuzzed", "loaded", "refused", "other")}
    print(f"| **all** | {total['fuzzed']} | {total['loaded']} | {total['refused']} | {total['other']} |\n")
    for failure in failed[:10]:
        print(f"- {failure['seed']}: {failure['mutations']}\n  -> {failure['error'][:300]}")
    verdict = "OK: every file loaded or was refused with a visionlora error" if not failed else "FAILED"
    print(f"{verdict}: {total['fuzzed']} files in {elapsed:.0f} s, {total['other']} other exceptions")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "seconds": args.seconds,
                    "seed": args.seed,
                    "counts": counts,
                    "failures": failed,
                },
                indent=1,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
