"""NaN/Inf losses and gradients during training: skipped steps change nothing, too many in a row stop the
run with a TrainingError naming the last good checkpoint, and nothing non-finite is ever written."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import visionlora as vl
from tests.reliability.harness import poisoned, train_recipe
from visionlora.train import run_recipe
from visionlora.train.checkpoint import checkpoint_dirs, latest_checkpoint, save_checkpoint
from visionlora.train.optim import NonFiniteSteps, optimizer_step

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")


def _trainer(tmp_path, limit: int = 3):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # as the runners make it
    if accelerator.scaler is not None:
        pytest.skip("under fp16 the grad scaler judges the gradients (a GPU without bf16)")
    torch.manual_seed(0)
    model = vl.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), vl.LoraConfig(targets="0", rank=2))
    with torch.no_grad():
        model[0].adapter("default").lora_B.fill_(0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler, trainable, NonFiniteSteps(limit, tmp_path)


def _backward(accelerator, model, poison: float = 1.0) -> torch.Tensor:
    loss = model(torch.randn(3, 4, device=accelerator.device)).float().pow(2).mean() * poison
    accelerator.backward(loss)
    return loss.detach()


@pytest.mark.parametrize(
    ("what", "max_grad_norm"),
    [("loss", 1.0), ("loss", None), ("gradient", 1.0), ("gradient", None)],
)
def test_a_non_finite_step_changes_nothing_and_the_next_finite_one_updates(tmp_path, caplog, what, max_grad_norm):
    accelerator, model, optimizer, scheduler, trainable, guard = _trainer(tmp_path)
    before = [p.detach().clone() for p in trainable]
    loss = _backward(accelerator, model, poison=math.nan if what == "loss" else 1.0)
    if what == "gradient":
        trainable[0].grad[0, 0] = math.inf
    with caplog.at_level(logging.WARNING, logger="visionlora.train.optim"):
        got = optimizer_step(accelerator, optimizer, scheduler, trainable, max_grad_norm, [loss], guard, 7)
    assert got is None
    assert all(torch.equal(b, p) for b, p in zip(before, trainable, strict=True))  # bit-identical
    assert all(p.grad is None for p in trainable) and not optimizer.state_dict()["state"]
    assert scheduler.last_epoch == 0 and (guard.in_a_row, guard.since, guard.skipped) == (1, 7, 1)
    expected = "the loss is nan" if what == "loss" else "the gradients hold NaN/Inf"
    assert f"step 7: {expected}" in caplog.text and "1 in a row" in caplog.text
    loss = _backward(accelerator, model)
    got = optimizer_step(accelerator, optimizer, scheduler, trainable, max_grad_norm, [loss], guard, 7)
    assert got == pytest.approx(float(loss))
    assert not all(torch.equal(b, p) for b, p in zip(before, trainable, strict=True))
    assert scheduler.last_epoch == 1 and guard.in_a_row == 0 and guard.skipped == 1


def test_the_limit_of_skips_in_a_row_raises_naming_the_steps_and_the_last_good_checkpoint(tmp_path):
    accelerator, model, optimizer, scheduler, trainable, guard = _trainer(tmp_path / "run")
    save_checkpoint(tmp_path / "run" / "checkpoints", 4, model=model, optimizer=optimizer.optimizer, state={})
    for attempt in range(2):
        loss = _backward(accelerator, model, poison=math.inf)
        assert optimizer_step(accelerator, optimizer, scheduler, trainable, 1.0, [loss], guard, 5) is None, attempt
    loss = _backward(accelerator, model, poison=math.inf)
    message = (
        r"3 optimizer steps in a row had a NaN/Inf loss or gradients, since step 5 \(last: the loss is inf\); "
        r"the run stopped \(train.max_nonfinite_steps=3\) and the last good checkpoint is at .*step-000004"
    )
    with pytest.raises(vl.TrainingError, match=message):
        optimizer_step(accelerator, optimizer, scheduler, trainable, 1.0, [loss], guard, 5)


def test_a_run_with_isolated_nan_steps_makes_all_its_steps_and_writes_finite_weights(digits_root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="visionlora.train.optim"), poisoned(lambda i: i in (1, 3, 4)) as hit:
        metrics = run_recipe(train_recipe(digits_root, max_steps=4), output=tmp_path / "run", progress=False)
    assert hit == [1, 3, 4] and metrics["steps"] == 4  # 7 training passes for 4 steps
    assert "step 2: the loss is nan" in caplog.text and "step 3: the loss is nan" in caplog.text
    assert "(2 in a row; stop at 5)" in caplog.text
    vl.read_adapter(tmp_path / "run" / "adapter.safetensors")  # the reader refuses NaN/Inf
    merged = load_file(tmp_path / "run" / "merged.safetensors")
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert all(math.isfinite(entry["train_loss"]) for entry in history)


def test_too_many_nan_steps_in_a_row_stop_the_run_and_its_last_checkpoint_resumes(digits_root, tmp_path):
    out = tmp_path / "run"
    recipe = train_recipe(digits_root, max_steps=10, checkpoint_every=1, max_nonfinite_steps=3)
    stop = r"3 optimizer steps in a row .* since step 4 .*checkpoints.step-000003"
    with pytest.raises(vl.TrainingError, match=stop), poisoned(lambda i: i >= 3):
        run_recipe(recipe, output=out, progress=False)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-000002", "step-000003"]
    assert not (out / "adapter.safetensors").exists() and not (out / ".visionlora.lock").exists()
    trained = load_file(latest_checkpoint(out) / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    metrics = run_recipe(train_recipe(digits_root, max_steps=5), output=out, resume="latest", progress=False)
    assert metrics["steps"] == 5 and vl.read_adapter(out / "adapter.safetensors").layers


def test_a_checkpoint_of_non_finite_weights_is_refused_and_nothing_is_written(tmp_path):
    model = vl.apply_lora(nn.Sequential(nn.Linear(4, 4)), vl.LoraConfig(targets="0", rank=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        model[0].adapter("default").lora_A[0, 0] = math.nan
    with pytest.raises(vl.TrainingError, match=r"checkpoint step 2 not written, 0.adapters.default.lora_A hold"):
        save_checkpoint(tmp_path / "checkpoints", 2, model=model, optimizer=optimizer, state={})
    assert not (tmp_path / "checkpoints").exists()


def test_max_nonfinite_steps_is_checked(digits_root):
    with pytest.raises(vl.ConfigError, match=r"train.max_nonfinite_steps: 0 is invalid; expected an integer >= 1"):
        train_recipe(digits_root, max_nonfinite_steps=0)
