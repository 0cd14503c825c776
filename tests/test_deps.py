"""A missing optional package is one line naming it and the command that installs it, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import visionlora as vl
from visionlora._deps import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], blocked: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``visionlora ARGV`` in a fresh interpreter in which the ``blocked`` packages cannot be imported."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))  # None in sys.modules: 'import x' raises ImportError\n"
        "from visionlora.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"visionlora {command}: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "argv,blocked,package,extra",
    [
        (["quickstart", "diffusion", "--steps", "1"], ["diffusers"], "diffusers", "diffusion"),
        (["quickstart", "--epochs", "1"], ["sklearn"], "scikit-learn", "train"),
        (["train", "recipes/classifier-tiny.yaml"], ["yaml"], "pyyaml", "train"),
        (["train", "recipes/classifier-tiny.yaml", "--output", "{tmp}/run"], ["accelerate"], "accelerate", "train"),
        (["targets", "timm:resnet18"], ["timm"], "timm", "train"),
        (["targets", "resnet18"], ["torchvision"], "torchvision", "train"),
    ],
)
def test_cli_names_the_missing_package_and_its_install_command(argv, blocked, package, extra, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = one_error_line(run_cli(argv, blocked, ROOT), argv[0])
    assert f"the Python package {package!r}, which is not installed" in line
    assert f"pip install 'visionlora[{extra}]'" in line


def test_merging_into_a_diffusers_folder_without_diffusers_is_one_line(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    model = vl.apply_lora(nn.Sequential(nn.Linear(4, 4)), vl.LoraConfig(targets="0", rank=2))
    adapter = vl.save_adapter(model, tmp_path / "adapter.safetensors")
    argv = ["merge", "--base", str(folder), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]
    line = one_error_line(run_cli(argv, ["diffusers"], tmp_path), "merge")
    assert "'diffusers', which is not installed" in line and "pip install 'visionlora[diffusion]'" in line


def test_inspect_and_export_need_no_optional_package(tmp_path):
    model = vl.apply_lora(nn.Sequential(nn.Conv2d(3, 8, 3)), vl.LoraConfig(targets="0", rank=2, alpha=3))
    adapter = vl.save_adapter(model, tmp_path / "adapter.safetensors")
    blocked = sorted(EXTRAS)
    assert run_cli(["inspect", str(adapter)], blocked, tmp_path).returncode == 0
    out = tmp_path / "kohya.safetensors"
    result = run_cli(["export", str(adapter), "--format", "kohya", "--out", str(out)], blocked, tmp_path)
    assert result.returncode == 0, result.stderr
    assert vl.read_adapter(out).layers["0"].alpha == 3.0


def test_require_raises_an_import_error_of_visionlora_naming_the_extra(monkeypatch):
    for name in ("timm", "timm.data"):  # as if never installed, even where an earlier test imported it
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(vl.MissingDependencyError, match=r"'timm', which is not installed.*visionlora\[train\]"):
        require("timm.data")
    with pytest.raises(ImportError):  # callers may catch the builtin too
        require("timm")
    assert require("torch") is torch


def test_require_says_when_an_installed_package_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "broken_pkg").mkdir()
    (tmp_path / "broken_pkg" / "__init__.py").write_text("import no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(vl.MissingDependencyError, match=r"'broken_pkg', which does not import .*no_such_module_here"):
        require("broken_pkg")
