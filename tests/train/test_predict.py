"""Using a trained classifier: predict and evaluate from the CLI with only the run's files, and merge
an adapter into a user's own base whose head is not ImageNet's."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import visionlora as vl
from tests.train.conftest import digit_folder, tiny_recipe
from visionlora.classify import INFO_KEY, ClassifierInfo, load_classifier
from visionlora.cli import main
from visionlora.train import run_recipe
from visionlora.train.recipe import parse_recipe

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run on a 3-class base file (a user's own fine-tuned ResNet-18), with its files."""
    root = tmp_path_factory.mktemp("predict")
    data = digit_folder(root / "data", per_class=16, split=True)
    torch.manual_seed(0)
    base = root / "base.safetensors"
    vl.io.files.write_safetensors(base, torchvision.models.resnet18(num_classes=7).state_dict(), {"format": "pt"})
    recipe = tiny_recipe(data, max_steps=6, lr=0.05, head_lr=0.05)
    recipe["model"]["weights"] = str(base)
    metrics = run_recipe(parse_recipe(recipe), output=root / "run", progress=False)
    return root, data, base, metrics


def _header(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_the_run_stores_classes_and_preprocessing_with_adapter_and_merged_checkpoint(trained):
    root, _, _, metrics = trained
    for name in ("adapter.safetensors", "merged.safetensors", "best/merged.safetensors"):
        info = ClassifierInfo.from_header(_header(root / "run" / name), name)
        assert info is not None and info.classes == ["digit0", "digit1", "digit2"]
        assert info.model == "torchvision:resnet18" and info.preprocess.size == 32
        assert info.preprocess.to_dict() == metrics["preprocess"]
        assert info.preprocess.mean == (0.485, 0.456, 0.406) and info.preprocess.crop_pct == 0.875
    assert json.loads(_header(root / "run" / "merged.safetensors")[INFO_KEY])["kwargs"] == {}


def test_predict_from_the_merged_checkpoint_alone_or_base_plus_adapter(trained, tmp_path, capsys):
    root, data, base, _ = trained
    images = data / "val" / "digit1"
    assert main(["predict", str(root / "run" / "merged.safetensors"), str(images), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split(": ", 1)[1].count("digit") == 2 for line in lines)
    out = tmp_path / "p.json"
    assert main(["predict", str(root / "run" / "merged.safetensors"), str(images), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    argv = ["predict", str(base), str(images), "--adapter", str(root / "run" / "adapter.safetensors")]
    assert main([*argv, "--arch", "torchvision:resnet18", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0][:3] == ["path", "class1", "probability1"] and len(rows) == 5
    assert all(len(row) == 1 + 2 * 3 for row in rows)  # top 5 of 3 classes: 3 pairs, header included
    for got, row in zip(merged, rows[1:], strict=True):
        assert got["classes"][0] == row[1] and abs(got["probabilities"][0] - float(row[2])) < 1e-5
    # The probabilities are the trained model's on the stored evaluation transform.
    model, info = load_classifier(root / "run" / "merged.safetensors")
    first = sorted(images.iterdir())[0]
    with torch.no_grad():
        probs = model(info.preprocess.eval_transform()(Image.open(first))[None]).softmax(-1)[0]
    assert merged[0]["path"] == str(first)
    assert merged[0]["probabilities"][0] == pytest.approx(float(probs.max()), abs=1e-6)
    assert sum(merged[0]["probabilities"]) == pytest.approx(1.0, abs=1e-5)  # 3 classes, top 5


def test_evaluate_reproduces_the_runs_validation_and_writes_the_confusion_png(trained, tmp_path, capsys):
    root, data, _, metrics = trained
    out = tmp_path / "eval"
    assert main(["evaluate", str(root / "run" / "merged.safetensors"), str(data / "val"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {metrics['val_accuracy']:.4f}" in printed and "recall digit2" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["confusion"] == metrics["confusion"] and result["images"] == 12
    assert result["macro_f1"] == pytest.approx(metrics["val_macro_f1"], abs=1e-9)
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_cli_takes_a_base_whose_head_is_not_the_1000_class_one(trained, tmp_path):
    root, _, base, _ = trained
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--base", str(base), "--arch", "torchvision:resnet18"]
    assert main([*argv, "--adapter", str(root / "run" / "adapter.safetensors"), "--out", str(out)]) == 0
    expected = load_file(root / "run" / "merged.safetensors")
    got = load_file(out)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-6) for k in got)


def test_bad_inputs_are_named(trained, tmp_path, capsys):
    root, data, base, _ = trained
    stray = tmp_path / "val"
    (stray / "digit9").mkdir(parents=True)
    Image.new("L", (16, 16)).save(stray / "digit9" / "a.png")
    merged = str(root / "run" / "merged.safetensors")
    assert main(["evaluate", merged, str(stray)]) == 2
    assert "class 'digit9' is not one of the model's classes" in capsys.readouterr().err
    assert main(["predict", str(base), str(data / "val")]) == 2
    assert "no architecture stored in the file" in capsys.readouterr().err
    assert main(["predict", merged, str(data / "val"), "--out", str(tmp_path / "p.txt")]) == 2
    assert "give a .csv or .json file" in capsys.readouterr().err
    assert main(["predict", merged, str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
