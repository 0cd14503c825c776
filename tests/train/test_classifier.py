"""The classifier recipe end to end on tiny digit images: outputs, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import visionlora as vl
from tests.train.conftest import side_by_side, tiny_recipe, torchrun
from visionlora.cli import main
from visionlora.train import dump_recipe, load_recipe, run_recipe
from visionlora.train.checkpoint import checkpoint_dirs
from visionlora.train.recipe import parse_recipe

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")


def test_a_run_writes_adapter_merged_checkpoint_metrics_recipe_and_report(digits_root, tmp_path):
    recipe = parse_recipe(tiny_recipe(digits_root, max_steps=4) | {"output": {"export": ["peft"]}})
    metrics = run_recipe(recipe, output=tmp_path / "run", progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter-peft",
        "adapter.safetensors",
        "best",
        "merged.safetensors",
        "metrics.json",
        "recipe.yaml",
        "report",
    ]
    assert metrics["steps"] == 4 and metrics["classes"] == ["digit0", "digit1", "digit2"]
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and 0 < metrics["trainable_percent"] < 5
    assert json.loads((out / "metrics.json").read_text())["val_macro_f1"] == metrics["val_macro_f1"]
    assert sum(map(sum, metrics["confusion"])) == 9  # 25% of 36 images
    for png in ("curves.png", "confusion.png", "worst.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_recipe(out / "recipe.yaml") == recipe
    # The merged checkpoint is a plain ResNet-18 with a 3-class head and the adapter's outputs.
    plain = torchvision.models.resnet18(num_classes=3).eval()
    plain.load_state_dict(load_file(out / "merged.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), _adapted_training_base(out)(x), rtol=1e-4, atol=1e-5)


def _adapted_training_base(out):
    """The adapter on the base the run started from: fresh weights drawn from the recipe's seed."""
    from accelerate.utils import set_seed

    set_seed(0)
    base = torchvision.models.resnet18().eval()
    base.fc = torch.nn.Linear(512, 3)
    return vl.load_adapter(base, out / "adapter.safetensors")


def test_resume_from_a_checkpoint_gives_the_same_adapter_as_an_uninterrupted_run(digits_root, tmp_path):
    recipe = parse_recipe(tiny_recipe(digits_root, checkpoint_every=2, keep_checkpoints=3))
    whole = tmp_path / "whole"
    run_recipe(recipe, output=whole, progress=False)
    assert [p.name for p in checkpoint_dirs(whole / "checkpoints")] == ["step-000002", "step-000004"]
    expected = load_file(whole / "adapter.safetensors")
    for step in ("step-000002", "step-000004"):  # mid-epoch (3 steps per epoch) and in the second epoch
        resumed = tmp_path / f"resumed-{step}"
        resumed.mkdir()
        shutil.copytree(whole / "checkpoints" / step, resumed / "checkpoints" / step)
        metrics = run_recipe(recipe, output=resumed, resume="latest", progress=False)
        got = load_file(resumed / "adapter.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), step
        assert metrics["steps"] == 6 and len(metrics["history"]) == 2


def test_an_interrupted_checkpoint_write_is_ignored_and_pruned(digits_root, tmp_path):
    recipe = parse_recipe(tiny_recipe(digits_root, max_steps=2, checkpoint_every=1, keep_checkpoints=1))
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-000009").mkdir(parents=True)  # what a kill during a write leaves
    run_recipe(recipe, output=out, progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


def test_cli_train_with_set_overrides_and_resume(digits_root, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(parse_recipe(tiny_recipe(digits_root))))
    out = tmp_path / "cli-run"
    argv = ["train", str(path), "--set", "train.max_steps=3", "--set", "train.checkpoint_every=2"]
    assert main([*argv, "--output", str(out)]) == 0
    assert "val. accuracy" in capsys.readouterr().out
    assert load_recipe(out / "recipe.yaml").train.max_steps == 3
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    assert (out / "adapter.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", r"train.lrr: unknown key; did you mean 'lr'\?"),
        ("train.lr=-1", r"train.lr: -1 is invalid; expected a finite number > 0"),
        ("train.mixed_precision=fp8", r"train.mixed_precision: expected 'auto' \| 'no' \| 'fp16' \| 'bf16'"),
        ("data.batch_size=many", r"data.batch_size: expected int, got str 'many'"),
        ("lora.rank=0", r"rank 0 is invalid"),
        ("modle.name=x", r"modle: unknown key; did you mean 'model'\?"),
        ("output.export=[onnx]", r"output.export: expected list\['visionlora' \| 'peft' \| 'diffusers' \| 'kohya'\]"),
        ("train.max_steps", r"--set 'train.max_steps': expected key=value"),
    ],
)
def test_bad_recipe_keys_and_values_are_named(digits_root, tmp_path, override, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(parse_recipe(tiny_recipe(digits_root))))
    with pytest.raises(vl.ConfigError, match=message):
        load_recipe(path, [override])


def test_yaml_reads_scientific_learning_rates_and_cli_errors_are_one_line(digits_root, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(parse_recipe(tiny_recipe(digits_root))).replace("lr: 0.01", "lr: 1e-3", 1))
    assert load_recipe(path).train.lr == 1e-3
    assert main(["train", str(path), "--set", "data.root=/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "visionlora train: error: data.root: /nowhere is not a folder; " + (
        "give an ImageFolder-style folder of class folders"
    )


RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("classifier-*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_classifier_recipe_runs(path, digits_root, tmp_path):
    overrides = [f"data.root={digits_root}", "model.weights=none", "train.max_steps=1", "data.num_workers=0"]
    if "tiny" not in path.stem:  # full-size architectures: keep the test small
        overrides += ["data.image_size=32", "data.batch_size=4", "output.export=[]"]
        if "vit" in path.stem:
            overrides += ["model.kwargs={img_size: 32, depth: 1}"]
    metrics = run_recipe(load_recipe(path, overrides), output=tmp_path / "run", progress=False)
    assert metrics["steps"] == 1 and (tmp_path / "run" / "merged.safetensors").is_file()


def test_two_processes_give_the_adapter_of_one_with_the_same_global_batch(digits_root, tmp_path):
    path = Path(__file__).parents[2] / "recipes" / "classifier-tiny.yaml"
    # Ranks grow from 1 to 4 after step 2 (lora.rank_schedule): growth under DDP too.
    sets = [
        "--set",
        f"data.root={digits_root}",
        "--set",
        "train.max_steps=3",
        "--set",
        "lora.rank_schedule={0: 1, 2: 4}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "visionlora", "train", str(path), *sets, "--output", str(tmp_path / "one")]
    two = [*torchrun(2), "-m", "visionlora", "train", str(path), *sets, "--output", str(tmp_path / "two")]
    for done in side_by_side([one, two], env):
        assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # documented tolerance: 1e-4 of each tensor's largest value (float sums in another order)
        assert (a[key] - b[key]).abs().max() <= 1e-4 * a[key].abs().max(), key
    assert a["blocks.0.attn.qkv.lora_B.weight"][:, 1:].abs().max() > 0  # grown and trained


def test_resume_keeps_the_epochs_loss_history_and_accumulation(digits_root, tmp_path):
    recipe = parse_recipe(tiny_recipe(digits_root, checkpoint_every=1, keep_checkpoints=6, grad_accum=2))
    run_recipe(recipe, output=tmp_path / "whole", progress=False)  # 3 batches per epoch: groups of 2 and 1
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for step in ("step-000001", "step-000002"):  # mid-epoch and at the end of the first epoch
        resumed = tmp_path / step
        shutil.copytree(tmp_path / "whole" / "checkpoints" / step, resumed / "checkpoints" / step)
        run_recipe(recipe, output=resumed, resume="latest", progress=False)
        got = json.loads((resumed / "metrics.json").read_text())
        assert got["history"] == expected["history"], step
        assert (
            load_file(resumed / "adapter.safetensors").keys()
            == load_file(tmp_path / "whole" / "adapter.safetensors").keys()
        )


def test_resuming_from_an_older_checkpoint_replaces_the_newer_ones(digits_root, tmp_path):
    out = tmp_path / "run"
    run_recipe(
        parse_recipe(tiny_recipe(digits_root, checkpoint_every=1, keep_checkpoints=6)), output=out, progress=False
    )
    assert len(checkpoint_dirs(out / "checkpoints")) == 5
    (out / "checkpoints" / "step-000009").mkdir()  # a newer, unrelated timeline
    (out / "checkpoints" / "step-000009" / "state.json").write_text("{}")
    recipe = parse_recipe(tiny_recipe(digits_root, checkpoint_every=1, keep_checkpoints=1))
    run_recipe(recipe, output=out, resume=str(out / "checkpoints" / "step-000002"), progress=False)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-000005"]  # written by the resumed run


def test_max_steps_runs_exactly_that_many_steps_past_epochs(digits_root, tmp_path):
    recipe = parse_recipe(tiny_recipe(digits_root, max_steps=7, epochs=1))
    metrics = run_recipe(recipe, output=tmp_path / "run", progress=False)
    assert metrics["steps"] == 7 and metrics["epochs"] == 3  # 3 steps per epoch


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seed=-1", r"train.seed: -1 is invalid; expected an integer from 0 to 2\*\*32 - 1"),
        (
            "output.export=[kohya]",
            r"output.export: \['kohya'\] is invalid; expected formats that can hold the new head",
        ),
    ],
)
def test_values_that_would_fail_late_are_refused_up_front(digits_root, tmp_path, override, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(parse_recipe(tiny_recipe(digits_root))))
    with pytest.raises(vl.ConfigError, match=message):
        load_recipe(path, [override])


def test_large_seeds_train(digits_root, tmp_path):
    recipe = parse_recipe(tiny_recipe(digits_root, max_steps=1, seed=2**32 - 1))
    assert run_recipe(recipe, output=tmp_path / "run", progress=False)["steps"] == 1
