"""The classifier recipe's training options: modes, BatchNorm policy, warm-up, regularisation, EMA,
layer decay, balanced sampling, early stopping and the best epoch's outputs; resume with all on."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import visionlora as vl
from tests.train.conftest import digit_folder, tiny_recipe
from visionlora.classify import evaluate, load_classifier
from visionlora.train import run_recipe
from visionlora.train.data import EpochBatches, class_weights
from visionlora.train.optim import layer_ids, param_groups, warmup_steps
from visionlora.train.recipe import ClassifierTrain, Train, parse_recipe

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def split_root(tmp_path_factory):
    return digit_folder(tmp_path_factory.mktemp("split") / "data", per_class=16, split=True)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A fresh ResNet-18 with a 3-class head, saved: a user's own fine-tuned base."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    vl.io.files.write_safetensors(path, model.state_dict(), {"format": "pt"})
    return path


def _recipe(root, base_file, **train):
    recipe = tiny_recipe(root, **train)
    recipe["model"]["weights"] = str(base_file)
    return recipe


def _run(recipe, out):
    return run_recipe(parse_recipe(recipe), output=out, progress=False)


def test_warm_up_is_a_fraction_of_the_run_unless_given_in_steps():
    assert warmup_steps(Train(), 135) == 7  # 5 % of 135
    assert warmup_steps(Train(warmup_fraction=0.0), 135) == 0
    assert warmup_steps(Train(warmup_steps=100), 135) == 100


def test_layer_decay_scales_each_resnet_stage_and_norms_and_biases_get_no_decay():
    model = torchvision.models.resnet18(num_classes=3)
    train = ClassifierTrain(lr=1.0, head_lr=1.0, weight_decay=0.05)
    ids = layer_ids(model)
    assert ids["conv1.weight"] == 0 and ids["layer1.0.conv1.weight"] == 2 and ids["layer4.1.conv2.weight"] == 9
    assert ids["fc.weight"] == 10
    groups = param_groups(model, train, head=["fc"], layer_decay=0.5, decay_norm_and_bias=False)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["layer4.1.conv2.weight"])] == (0.5, 0.05)
    assert lr_of[id(params["layer4.0.conv1.weight"])] == (0.25, 0.05)
    assert lr_of[id(params["conv1.weight"])] == (0.5**10, 0.05)
    assert lr_of[id(params["layer4.1.bn2.weight"])] == (0.5, 0.0)
    assert lr_of[id(params["fc.bias"])] == (1.0, 0.0) and lr_of[id(params["fc.weight"])] == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_balanced_batches_draw_every_class_about_equally():
    labels = [0] * 90 + [1] * 10
    batches = EpochBatches(100, 10, seed=0, weights=class_weights(labels))
    drawn: Counter[int] = Counter()
    for epoch in range(20):
        batches.set_position(epoch)
        drawn.update(labels[i] for batch in batches for i in batch)
    assert abs(drawn[0] - drawn[1]) < 0.1 * 2000
    again = EpochBatches(100, 10, seed=0, weights=class_weights(labels))
    again.set_position(3)
    batches.set_position(3)
    assert list(again) == list(batches)


def _buffers(path):
    return {k: v for k, v in load_file(path).items() if "running_" in k}


def test_batchnorm_policies_frozen_keeps_recalibrate_fixes_train_updates(split_root, base_file, tmp_path):
    base = load_file(base_file)
    frozen = _run(_recipe(split_root, base_file, max_steps=3, batchnorm="frozen"), tmp_path / "frozen")
    assert frozen["steps"] == 3 and not _buffers(tmp_path / "frozen" / "adapter.safetensors")
    merged = load_file(tmp_path / "frozen" / "merged.safetensors")
    assert all(torch.equal(merged[k], base[k]) for k in base if "running_" in k)
    one, three = ({"max_steps": n, "batchnorm": "recalibrate"} for n in (1, 3))
    _run(_recipe(split_root, base_file, **one), tmp_path / "re1")
    _run(_recipe(split_root, base_file, **three), tmp_path / "re3")
    re1, re3 = _buffers(tmp_path / "re1" / "adapter.safetensors"), _buffers(tmp_path / "re3" / "adapter.safetensors")
    assert re1 and re1.keys() == re3.keys() and all(torch.equal(re1[k], re3[k]) for k in re1)  # fixed once
    assert not torch.equal(re1["layer1.0.bn1.running_mean"], base["layer1.0.bn1.running_mean"])
    _run(_recipe(split_root, base_file, max_steps=1, batchnorm="train"), tmp_path / "tr1")
    _run(_recipe(split_root, base_file, max_steps=3, batchnorm="train"), tmp_path / "tr3")
    tr1, tr3 = _buffers(tmp_path / "tr1" / "adapter.safetensors"), _buffers(tmp_path / "tr3" / "adapter.safetensors")
    assert not torch.equal(tr1["layer1.0.bn1.running_mean"], tr3["layer1.0.bn1.running_mean"])  # every step


def test_head_mode_trains_the_head_only_and_full_mode_everything(split_root, base_file, tmp_path):
    base = load_file(base_file)
    head = _run(_recipe(split_root, base_file, max_steps=2, mode="head"), tmp_path / "head")
    assert not (tmp_path / "head" / "adapter.safetensors").exists() and head["mode"] == "head"
    merged = load_file(tmp_path / "head" / "merged.safetensors")
    changed = sorted(k for k in base if not torch.equal(merged[k], base[k]))
    assert changed == ["fc.bias", "fc.weight"] and head["trainable_percent"] < 0.02
    _run(_recipe(split_root, base_file, max_steps=2, mode="full"), tmp_path / "full")
    merged = load_file(tmp_path / "full" / "merged.safetensors")
    weights = [k for k in base if k.endswith("conv1.weight")]
    assert all(not torch.equal(merged[k], base[k]) for k in weights)
    with pytest.raises(vl.ConfigError, match=r"output.export: \['peft'\] is invalid; expected \[\] when train.mode"):
        parse_recipe(_recipe(split_root, base_file, mode="full") | {"output": {"export": ["peft"]}})


def test_every_option_on_resumes_bit_for_bit(split_root, base_file, tmp_path):
    recipe = _recipe(
        split_root,
        base_file,
        epochs=3,
        checkpoint_every=2,
        keep_checkpoints=5,
        mixup=0.4,
        cutmix=1.0,
        label_smoothing=0.1,
        ema_decay=0.9,
        layer_decay=0.8,
        batchnorm="train",
        channels_last="always",
        early_stopping={"patience": 5, "metric": "val_loss"},
    )
    recipe["data"] |= {"auto_augment": "randaugment", "random_erasing": 0.5, "balanced": True, "crop_scale": [0.5, 1]}
    whole = tmp_path / "whole"
    expected = _run(recipe, whole)
    assert expected["steps"] == 12 and expected["best_epoch"] in (1, 2, 3)  # 4 steps per epoch
    for step in ("step-000004", "step-000006"):  # at an epoch's end, and mid-epoch
        resumed = tmp_path / step
        shutil.copytree(whole / "checkpoints" / step, resumed / "checkpoints" / step)
        got = run_recipe(parse_recipe(recipe), output=resumed, resume="latest", progress=False)
        assert got["history"] == expected["history"], step
        for name in ("adapter.safetensors", "best/adapter.safetensors"):
            a, b = load_file(whole / name), load_file(resumed / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, name)


def test_early_stopping_ends_the_run_and_best_files_reproduce_the_best_epoch(split_root, base_file, tmp_path):
    recipe = _recipe(split_root, base_file, epochs=6, lr=0.05, head_lr=0.05)
    recipe["train"]["early_stopping"] = {"patience": 1, "metric": "val_loss"}
    out = tmp_path / "run"
    metrics = _run(recipe, out)
    history = metrics["history"]
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    assert metrics["best_epoch"] == best + 1 and metrics["best"]["val_loss"] == history[best]["val_loss"]
    assert metrics["stopped_early"] == (len(history) < 6)
    if metrics["stopped_early"]:
        assert len(history) == best + 2  # one epoch without improvement, patience 1
    model, info = load_classifier(out / "best" / "merged.safetensors")
    found = evaluate(model, info, split_root / "val")
    assert found["accuracy"] == pytest.approx(history[best]["val_accuracy"], abs=1e-6)
    model, info = load_classifier(out / "merged.safetensors")
    assert evaluate(model, info, split_root / "val")["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)


def test_ema_weights_are_what_is_validated_and_exported(split_root, base_file, tmp_path):
    plain = _run(_recipe(split_root, base_file, max_steps=6, lr=0.05), tmp_path / "plain")
    ema = _run(_recipe(split_root, base_file, max_steps=6, lr=0.05, ema_decay=0.9), tmp_path / "ema")
    a, b = load_file(tmp_path / "plain" / "adapter.safetensors"), load_file(tmp_path / "ema" / "adapter.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    model, info = load_classifier(tmp_path / "ema" / "merged.safetensors")
    found = evaluate(model, info, split_root / "val")
    assert found["accuracy"] == pytest.approx(ema["val_accuracy"], abs=1e-6)
    assert json.loads((tmp_path / "ema" / "metrics.json").read_text())["val_loss"] == ema["val_loss"]
    assert plain["steps"] == ema["steps"] == 6


def test_channels_last_gives_the_contiguous_result(split_root, base_file, tmp_path):
    _run(_recipe(split_root, base_file, max_steps=2), tmp_path / "a")
    _run(_recipe(split_root, base_file, max_steps=2, channels_last="always"), tmp_path / "b")
    # Convolutions sum in another order; Adam's first steps magnify that in near-zero gradients, so
    # the trained models are compared by their outputs.
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    for run in ("a", "b"):
        model, _ = load_classifier(tmp_path / run / "merged.safetensors")
        with torch.no_grad():
            outputs.append(model(x))
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-3 * outputs[0].abs().max()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train": {"mixup": 0.2}, "data": {"cache_features": True, "augment": False}}, "data.cache_features"),
        ({"data": {"augment": False, "auto_augment": "randaugment"}}, "data.auto_augment"),
        ({"train": {"layer_decay": 1.5}}, "train.layer_decay"),
        ({"train": {"early_stopping": {"patience": 0}}}, "train.early_stopping.patience"),
        ({"train": {"batchnorm": "frozen2"}}, "train.batchnorm: expected 'frozen' | 'recalibrate' | 'train'"),
        ({"train": {"warmup_fraction": 1.0}}, "train.warmup_fraction"),
    ],
)
def test_option_values_are_checked_by_name(split_root, base_file, override, message):
    recipe = _recipe(split_root, base_file)
    for section, values in override.items():
        recipe[section] = {**recipe[section], **values}
    with pytest.raises(vl.ConfigError, match=message.replace("|", r"\|")):
        parse_recipe(recipe)


def test_compiled_run_trains_the_eager_runs_adapter_and_resumes_bit_for_bit(split_root, tmp_path):
    """train.compile runs the model through torch.compile (inductor on CPU); the result is the eager one's."""
    results = {}
    for compiled in (False, True):
        recipe = tiny_recipe(split_root, max_steps=4, compile=compiled, checkpoint_every=2)
        recipe["model"] = {
            "name": "timm:vit_tiny_patch16_224",
            "weights": "none",
            "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1},
        }
        recipe["lora"] = {"targets": ["blocks.*.attn.qkv"], "rank": 4, "alpha": 8}
        results[compiled] = _run(recipe, tmp_path / str(compiled))
    assert results[True]["val_loss"] == pytest.approx(results[False]["val_loss"], rel=1e-4)
    a = load_file(tmp_path / "False" / "adapter.safetensors")
    b = load_file(tmp_path / "True" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-3 * a[key].abs().max(), key
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "True" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    run_recipe(parse_recipe(recipe), output=resumed, resume="latest", progress=False)
    c = load_file(resumed / "adapter.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
