"""Rank schedules in the training loop: growth at the scheduled steps, checkpoints that record the
ranks, resume across a growth step bit for bit, and a checkpoint of another schedule refused."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch
from torch import nn

import visionlora as vl
from tests.train.test_loop import PointsRecipe, PointsTask
from visionlora.train.loop import run_loop
from visionlora.train.task import Built

pytest.importorskip("accelerate")


STEPS = {0: 1, 4: 2, 6: 3}  # growth after steps 4 and 6 of 9; two batches per step (grad_accum=2)


class GrowingPoints(PointsTask):
    """The loop's smallest task with a rank-3 adapter grown by a schedule (1 -> 2 -> 3 over 9 steps)."""

    schedule: dict[float, int] = STEPS

    def build(self, accelerator: Any) -> Built:
        built = super().build(accelerator)
        torch.manual_seed(1)
        cfg = vl.LoraConfig(targets="0", rank=3, rank_schedule=self.schedule)
        self.model = vl.apply_lora(nn.Sequential(nn.Linear(6, 8)), cfg)
        self.y = self.x @ torch.randn(6, 8)
        self.seen: list[int] = []
        return Built({"model": self.model}, built.batches)

    def loss(self, run: Any, batch: Any, epoch: int) -> torch.Tensor:
        self.seen.append(self.model[0].adapter("default").current_rank)
        return super().loss(run, batch, epoch)


def _run(tmp_path, name: str, schedule: dict[float, int], resume: str | None = None) -> tuple[dict, GrowingPoints]:
    recipe = PointsRecipe()
    recipe.train.checkpoint_every, recipe.train.keep_checkpoints = 2, 5
    task = GrowingPoints(recipe)
    task.schedule = schedule
    return run_loop(task, output=tmp_path / name, resume=resume, progress=False), task


def test_the_loop_grows_at_the_scheduled_steps_and_writes_the_final_rank(tmp_path):
    metrics, task = _run(tmp_path, "run", STEPS)
    assert metrics["steps"] == 9
    assert task.seen == [1] * 8 + [2] * 4 + [3] * 6  # the batches of steps 1-4, 5-6, 7-9
    ranks = {
        step: json.loads((tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())["ranks"]
        for step in (2, 4, 6, 8)
    }
    assert ranks == {s: {"model": {"default": {"0": r}}} for s, r in ((2, 1), (4, 2), (6, 3), (8, 3))}
    file = vl.read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert file.config.rank_schedule == STEPS and file.layers["0"].rank == 3
    assert file.tensors["0.lora_B.weight"][:, 2].abs().max() > 0  # the last component trained
    # Fractions of the run: 0.5 and 0.7 of 9 steps are steps 4 and 6 (floor of 4.5 and 6.3).
    _, fractions = _run(tmp_path, "fractions", {0: 1, 0.5: 2, 0.7: 3})
    assert fractions.seen == task.seen


@pytest.mark.parametrize("step", [2, 4])  # before the first growth, and at it
def test_a_run_resumed_across_growth_steps_ends_bit_for_bit(tmp_path, step):
    whole, _ = _run(tmp_path, "whole", STEPS)
    checkpoint = tmp_path / "whole" / "checkpoints" / f"step-{step:06d}"
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    resumed, task = _run(tmp_path, "resumed", STEPS, resume="latest")
    assert task.seen[0] == STEPS[0 if step < 4 else 4]
    a = vl.read_adapter(tmp_path / "whole" / "adapter.safetensors").tensors
    b = vl.read_adapter(tmp_path / "resumed" / "adapter.safetensors").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_loss"] == whole["final_loss"]


def test_a_checkpoint_of_another_schedule_is_refused_before_anything_changes(tmp_path):
    _run(tmp_path, "run", STEPS)
    folder = tmp_path / "run" / "checkpoints" / "step-000004"
    message = r"model adapters' ranks at step 4 are not what this recipe's rank schedule gives \(first: 0 \(default\)"
    with pytest.raises(vl.AdapterFileError, match=message + r" at rank 2, expected 1\)"):
        _run(tmp_path, "other", {0: 1, 6: 3}, resume=str(folder))
    state = json.loads((folder / "state.json").read_text())
    del state["ranks"]  # as a checkpoint written before rank schedules: fine without one, refused with one
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(vl.AdapterFileError, match=message + r" at rank none, expected 2\)"):
        _run(tmp_path, "older", STEPS, resume=str(folder))


def test_a_schedule_step_the_run_never_reaches_is_refused_before_training(tmp_path):
    with pytest.raises(vl.ConfigError, match=r"grows 0 to rank 3 at step 9, and the run has 9 optimizer steps"):
        _run(tmp_path, "late", {0: 1, 9: 3})
    assert not (tmp_path / "late" / "checkpoints").exists()
