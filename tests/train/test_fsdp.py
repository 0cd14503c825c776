"""The classifier recipe under FSDP version 2 on two CPU processes, and the FSDP set-ups it refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import visionlora as vl
from tests.train.conftest import side_by_side, torchrun

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

RECIPE = Path(__file__).parents[2] / "recipes" / "classifier-tiny.yaml"
LAUNCHER = Path(__file__).with_name("fsdp_cpu.py")


def _env(wrap: str = "Block") -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "VISIONLORA_TEST_FSDP_WRAP": wrap,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }


def _command(argv: list[str], out: Path, *sets: str, resume: bool = False) -> list[str]:
    command = [*argv, "train", str(RECIPE), *[a for s in sets for a in ("--set", s)], "--output", str(out)]
    return command + (["--resume", "latest"] if resume else [])


def _train(
    argv: list[str], out: Path, *sets: str, wrap: str = "Block", resume: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(argv, out, *sets, resume=resume), env=_env(wrap), capture_output=True, text=True, timeout=300
    )


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> None:
    assert a.keys() == b.keys()
    for key in a:  # relative to each tensor's largest value (float sums in another order)
        assert (a[key] - b[key]).abs().max() <= tolerance * a[key].abs().max().clamp_min(1e-12), key


def test_two_fsdp_processes_train_resume_and_write_what_one_process_does(digits_root, tmp_path):
    # max_grad_norm: clipped at every step, so the processes must agree on the whole gradient's norm.
    # The adapters grow from rank 1 to 4 after step 2: growth under FSDP, and a resume across it.
    sets = (
        f"data.root={digits_root}",
        "train.max_steps=3",
        "lora.rank_schedule={0: 1, 2: 4}",
        "train.max_grad_norm=1e-3",
        "train.checkpoint_every=1",
    )
    fsdp = [*torchrun(2), str(LAUNCHER)]
    runs = [
        _command([sys.executable, "-m", "visionlora"], tmp_path / "one", *sets),
        _command(fsdp, tmp_path / "two", *sets),
    ]
    for done in side_by_side(runs, _env()):
        assert done.returncode == 0, done.stderr[-6000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["distributed"] == "FSDP"
    one, two = tmp_path / "one", tmp_path / "two"
    # Documented tolerance: 1e-4 of each tensor's largest value, as for DDP.
    _close(load_file(one / "adapter.safetensors"), load_file(two / "adapter.safetensors"), 1e-4)
    _close(load_file(one / "merged.safetensors"), load_file(two / "merged.safetensors"), 1e-4)
    # Checkpoints hold whole tensors, the same as a one-process run's.
    step = "checkpoints/step-000001"
    for part in ("trainable.safetensors", "optimizer.safetensors"):
        _close(load_file(one / step / part), load_file(two / step / part), 1e-4)

    # Resumed under FSDP from step 1, the run ends where the uninterrupted one did.
    assert load_file(two / "adapter.safetensors")["blocks.0.attn.qkv.lora_B.weight"][:, 1:].abs().max() > 0
    resumed = tmp_path / "resumed"
    shutil.copytree(two / step, resumed / step)
    done = _train([*torchrun(2), str(LAUNCHER)], resumed, *sets[:4], resume=True)
    assert done.returncode == 0, done.stderr[-6000:]
    _close(load_file(two / "adapter.safetensors"), load_file(resumed / "adapter.safetensors"), 1e-6)


def test_a_wrap_policy_that_splits_a_lora_layer_stops_the_run_before_training(digits_root, tmp_path):
    done = _train([*torchrun(2), str(LAUNCHER)], tmp_path / "run", f"data.root={digits_root}", wrap="size:1000")
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr  # torchrun: a worker exited with status 2
    assert "inside the LoRA layer blocks.0.attn.qkv" in done.stderr and "fsdp_min_num_params" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def _fsdp_accelerator(**plugin: object) -> SimpleNamespace:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(**plugin))
    return SimpleNamespace(distributed_type=DistributedType.FSDP, state=state)


def _small_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=4))
    return model


def test_fsdp_checks_name_what_to_change(monkeypatch):
    from visionlora.train.sharding import check_fsdp

    with pytest.raises(vl.ConfigError, match=r"FSDP version 1.*--fsdp_version 2"):
        check_fsdp(_fsdp_accelerator(fsdp_version=1), _small_model())
    # 0.base has 16·32 + 32 = 544 parameters: a smaller threshold would shard it without its adapter.
    by_size = {"fsdp_version": 2, "auto_wrap_policy": "size_based_wrap"}
    with pytest.raises(vl.ConfigError, match=r"shard 0.base \(Linear\).*LoRA layer 0.*544 or more"):
        check_fsdp(_fsdp_accelerator(**by_size, min_num_params=543), _small_model())
    check_fsdp(_fsdp_accelerator(**by_size, min_num_params=544), _small_model())
    check_fsdp(SimpleNamespace(distributed_type="MULTI_CPU"), _small_model())  # not FSDP: nothing to check
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")  # as on torch < 2.6
    with pytest.raises(vl.ConfigError, match=r"torch 2.7 or newer under FSDP.*this is torch"):
        check_fsdp(_fsdp_accelerator(**by_size, min_num_params=544), _small_model())


def test_clipping_under_fsdp_unscales_once_and_clips_the_trained_parameters_only():
    from accelerate.utils import DistributedType

    from visionlora.train.optim import NonFiniteSteps, optimizer_step

    class Accelerator:  # accelerate's clip_grad_norm_ under FSDP, given a subset of the model, unscales twice
        distributed_type = DistributedType.FSDP
        is_main_process, scaler, optimizer_step_was_skipped, unscaled = True, None, False, 0

        def reduce(self, tensor, reduction):
            return tensor

        def unscale_gradients(self):
            self.unscaled += 1

        def clip_grad_norm_(self, params, max_norm):
            raise AssertionError("accelerate's clip_grad_norm_ must not be used under FSDP")

    model = _small_model()
    trained = [p for p in model.parameters() if p.requires_grad]
    model(torch.randn(4, 16)).pow(2).sum().backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in trained])
    optimizer = torch.optim.SGD(trained, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in trained]
    accelerator = Accelerator()
    loss = optimizer_step(
        accelerator, optimizer, scheduler, trained, 1e-3, [torch.tensor(1.0)], NonFiniteSteps(5, Path(".")), 1
    )
    assert loss == 1.0 and accelerator.unscaled == 1 and norm > 1e-3
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trained, before, strict=True)))
    assert torch.isclose(moved, torch.tensor(1e-3), rtol=1e-3)  # one SGD step of the clipped gradient
