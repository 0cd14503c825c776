"""The one training loop: a third task, written here in a few lines, gets accumulation, checkpoints,
resume, the NaN/Inf guard, the lock and the shared outputs from run_loop alone."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import visionlora as vl
from visionlora.train.data import EpochBatches
from visionlora.train.loop import run_loop
from visionlora.train.outputs import Outputs
from visionlora.train.recipe import RECIPES, Output, Train
from visionlora.train.run import TASKS
from visionlora.train.task import Built, Prepared, RunState, Task

pytest.importorskip("accelerate")


@dataclass
class PointsData:
    batch_size: int = 4
    count: int = 24


@dataclass
class PointsRecipe:
    """Regression of y = x M onto 24 fixed points: the smallest recipe a task can have."""

    task: str = "points"
    data: PointsData = field(default_factory=PointsData)
    train: Train = field(default_factory=lambda: Train(epochs=3, lr=0.05, warmup_steps=2, grad_accum=2))
    output: Output = field(default_factory=Output)


class PointsTask(Task):
    """A third task: a Linear model with LoRA, its batch order, its loss; nothing else."""

    def build(self, accelerator: Any) -> Built:
        torch.manual_seed(1)
        self.model = vl.apply_lora(nn.Sequential(nn.Linear(6, 3)), vl.LoraConfig(targets="0", rank=2))
        self.x = torch.randn(self.recipe.data.count, 6)
        self.y = self.x @ torch.randn(6, 3)
        self.epochs_seen: list[int] = []
        batches = EpochBatches(self.recipe.data.count, self.recipe.data.batch_size, seed=0)
        return Built({"model": self.model}, batches)

    def batches(self, run: Prepared, epoch: int) -> Any:
        return run.batches

    def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
        return (run.models[0](self.x[batch]) - self.y[batch]).pow(2).mean()

    def after_epoch(self, run: Prepared, state: RunState) -> dict[str, Any]:
        self.epochs_seen.append(state.epoch)
        return {"epoch": state.epoch + 1, "step": state.step, "last_loss": state.losses[-1]}

    def finish(self, run: Prepared, state: RunState) -> Outputs:
        metrics = {"first_loss": state.losses[0], "final_loss": state.losses[-1], "history": state.history}
        return Outputs(metrics, "merged.safetensors")


def _run(tmp_path, name: str, resume: str | None = None, **train: Any) -> dict[str, Any]:
    recipe = PointsRecipe()
    for key, value in train.items():
        setattr(recipe.train, key, value)
    return run_loop(PointsTask(recipe), output=tmp_path / name, resume=resume, progress=False)


def _adapter(folder) -> dict[str, torch.Tensor]:
    return vl.read_adapter(folder / "adapter.safetensors").tensors


def test_a_third_task_trains_and_writes_what_every_task_writes(tmp_path):
    metrics = _run(tmp_path, "run")
    out = tmp_path / "run"
    # 24 points in batches of 4, two batches per step: 3 steps an epoch, 3 epochs
    assert metrics["steps"] == 9 and metrics["processes"] == 1
    assert metrics["final_loss"] < metrics["first_loss"]
    assert [(h["epoch"], h["step"]) for h in metrics["history"]] == [(1, 3), (2, 6), (3, 9)]
    files = ["adapter.safetensors", "merged.safetensors", "metrics.json", "recipe.yaml"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    fresh = vl.load_adapter(nn.Sequential(nn.Linear(6, 3)), out / "adapter.safetensors")
    assert fresh[0].adapter("default").lora_B.abs().max() > 0  # it trained
    with pytest.raises(vl.ConfigError, match="holds an earlier run"):  # the lock and folder policy apply
        _run(tmp_path, "run")


@pytest.mark.parametrize("step", [2, 4])  # mid-epoch 1, and mid-epoch 2 after an epoch boundary
def test_a_resumed_run_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path, step):
    whole = _run(tmp_path, "whole", checkpoint_every=2, keep_checkpoints=5)
    checkpoint = tmp_path / "whole" / "checkpoints" / f"step-{step:06d}"
    state = json.loads((checkpoint / "state.json").read_text())  # the run state, where it was
    assert (state["step"], state["epoch"], len(state["losses"])) == (step, step // 3, step)
    assert [h["epoch"] for h in state["history"]] == list(range(1, step // 3 + 1))
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    resumed = _run(tmp_path, "resumed", resume="latest", checkpoint_every=2, keep_checkpoints=5)
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_loss"] == whole["final_loss"] and resumed["steps"] == whole["steps"] == 9


def test_a_checkpoint_whose_run_state_is_malformed_is_refused_by_name(tmp_path):
    _run(tmp_path, "run", max_steps=2, checkpoint_every=1)
    path = tmp_path / "run" / "checkpoints" / "step-000001" / "state.json"
    state = json.loads(path.read_text())
    state["losses"] = ["nan?"]
    path.write_text(json.dumps(state))
    with pytest.raises(vl.AdapterFileError, match=r"entries \['losses'\] are missing or not what a run writes"):
        _run(tmp_path, "run", resume=str(path.parent), max_steps=2)


def test_the_nan_guard_skips_a_poisoned_step_in_any_task(tmp_path):
    class Poisoned(PointsTask):
        calls = 0

        def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
            Poisoned.calls += 1
            loss = super().loss(run, batch, epoch)
            return loss * math.nan if Poisoned.calls == 3 else loss

    recipe = PointsRecipe()
    metrics = run_loop(Poisoned(recipe), output=tmp_path / "run", progress=False)
    assert metrics["steps"] == 9 and math.isfinite(metrics["final_loss"])  # the skipped step was made up


def test_every_recipe_task_has_a_training_task():
    assert set(TASKS) == set(RECIPES)
