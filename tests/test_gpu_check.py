"""scripts/gpu_check.sh --smoke: the GPU check's whole path on the CPU at toy sizes, one JSON file out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")
pytest.importorskip("diffusers")


def test_the_smoke_run_passes_the_gpu_tests_on_the_cpu_and_writes_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("VISIONLORA_GPU_TESTS", None)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] is True and report["device"].startswith("cpu")
    assert [p["phase"] for p in report["phases"]] == ["install", "tests", "bench-resnet", "bench-unet"]
    assert all(p["rc"] == 0 for p in report["phases"])
    tests = report["tests"]
    assert tests["failed"] == 0 and tests["passed"] >= 30  # the merge, compile and bf16 recipe tests ran
    for model, peft in (("resnet", "peft"), ("unet", "peft (add_adapter)")):
        rows = report["bench"][model][f"{model}_training"]
        assert {"visionlora", peft, "visionlora, compiled", f"{peft}, compiled"} <= set(rows)
        goals = report["goals"][model]
        assert goals["compiled_vs_peft_eager"]["ratio"] > 0 and goals["merged_vs_base"]["ratio"] > 0
        assert goals["peak_vs_peft"] == {"ratio": None, "goal": 1.0, "met": None}  # no CUDA memory on a CPU
    assert "gpu check (smoke, cpu" in done.stdout
