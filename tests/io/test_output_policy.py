"""Where outputs go: an existing output is replaced only when asked, nothing is written outside the chosen
folder, and a full disk gives a clear error with the old output intact and no temporary left behind."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

import visionlora as vl
from visionlora.cli import main
from visionlora.io import files

FORMATS = [("visionlora", "a.safetensors"), ("kohya", "k.safetensors"), ("diffusers", "d.safetensors"), ("peft", "p")]


def adapted(value: float = 0.5) -> nn.Module:
    model = vl.apply_lora(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)), vl.LoraConfig(targets="*", rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(value)
    return model


def lora_a(path) -> float:
    """The value the first LoRA A tensor of the adapter at ``path`` holds (A is stored unscaled in every format)."""
    return float(next(v for k, v in vl.read_adapter(path).tensors.items() if "lora_A" in k).flatten()[0])


def snapshot(path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("fmt", "name"), FORMATS)
def test_exports_refuse_an_existing_output_unless_overwrite(tmp_path, fmt, name):
    path = vl.export_adapter(adapted(0.5), tmp_path / name, format=fmt)
    before = snapshot(path)
    with pytest.raises(vl.AdapterFileError, match=rf"{name}: exists; pass overwrite=True \(--overwrite"):
        vl.export_adapter(adapted(0.7), tmp_path / name, format=fmt)
    assert snapshot(path) == before
    vl.export_adapter(adapted(0.7), tmp_path / name, format=fmt, overwrite=True)
    assert snapshot(path) != before
    assert lora_a(path) == pytest.approx(0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporaries left


def test_save_adapter_and_export_merged_refuse_an_existing_file_unless_overwrite(tmp_path):
    for write in (vl.save_adapter, vl.export_merged):
        path = write(adapted(0.5), tmp_path / f"{write.__name__}.safetensors")
        before = path.read_bytes()
        with pytest.raises(vl.AdapterFileError, match="exists; pass overwrite=True"):
            write(adapted(0.7), path)
        assert path.read_bytes() == before
        write(adapted(0.7), path, overwrite=True)
        assert path.read_bytes() != before


def test_an_unrelated_file_or_folder_is_never_replaced_even_with_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(vl.AdapterFileError, match=r"mine: exists and has no adapter_config\.json"):
        vl.export_adapter(adapted(), tmp_path / "mine", format="peft", overwrite=True)
    with pytest.raises(vl.AdapterFileError, match=r"notes.txt: is a file; a folder is written here"):
        vl.export_adapter(adapted(), tmp_path / "notes.txt", format="peft", overwrite=True)
    with pytest.raises(vl.AdapterFileError, match=r"mine: is a folder; give a file path"):
        vl.save_adapter(adapted(), tmp_path / "mine", overwrite=True)
    assert snapshot(tmp_path) == {"mine/notes.txt": b"keep", "notes.txt": b"keep"}
    vl.export_adapter(adapted(), tmp_path / "empty", format="peft")  # an empty folder is not an output
    (tmp_path / "empty2").mkdir()
    vl.export_adapter(adapted(), tmp_path / "empty2", format="peft")
    assert vl.read_adapter(tmp_path / "empty2").layers


def test_the_cli_export_and_merge_refuse_to_overwrite_without_the_flag(tmp_path, capsys):
    from tests.test_cli import trained_adapter

    trained_adapter(tmp_path)
    merge = ["merge", "--base", str(tmp_path / "base.safetensors"), "--arch", "resnet18"]
    merge += ["--adapter", str(tmp_path / "adapter.safetensors"), "--out", str(tmp_path / "m.safetensors")]
    export = ["export", str(tmp_path / "adapter.safetensors"), "--format", "visionlora", "--out", str(tmp_path / "x")]
    for argv in (merge, export):
        assert main(argv) == 0
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "exists; pass overwrite=True (--overwrite on the command line)" in err and "\n" not in err.strip()
        assert main([*argv, "--overwrite"]) == 0


def _full_disk_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_rust(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("failure", [_full_disk_save, _full_disk_rust], ids=["OSError", "SafetensorError"])
@pytest.mark.parametrize(("fmt", "name"), FORMATS)
def test_a_full_disk_names_the_output_and_keeps_the_old_one(tmp_path, monkeypatch, failure, fmt, name):
    path = vl.export_adapter(adapted(0.5), tmp_path / name, format=fmt)
    before = snapshot(path)
    monkeypatch.setattr(files, "save_file", failure)
    message = rf"{tmp_path / name}: could not be written \(no space left on the device\); the existing one is unchanged"
    with pytest.raises(vl.AdapterFileError, match=message):
        vl.export_adapter(adapted(0.7), tmp_path / name, format=fmt, overwrite=True)
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the temporary file or folder is gone
    with pytest.raises(vl.AdapterFileError, match=r"new.safetensors: could not be written .*; nothing was written"):
        vl.save_adapter(adapted(), tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()


def test_a_failing_rename_or_text_write_keeps_the_old_output(tmp_path, monkeypatch):
    path = vl.save_adapter(adapted(0.5), tmp_path / "a.safetensors")
    folder = vl.export_adapter(adapted(0.5), tmp_path / "p", format="peft")
    before = snapshot(tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(vl.AdapterFileError, match=r"a.safetensors: could not be written \(no space left"):
        vl.save_adapter(adapted(0.7), path, overwrite=True)
    monkeypatch.undo()
    monkeypatch.setattr(files.Path, "write_text", no_space)
    with pytest.raises(vl.AdapterFileError, match=r"p: could not be written \(no space left on the device\)"):
        vl.export_adapter(adapted(0.7), folder, format="peft", overwrite=True)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_folders_are_swapped_in_whole_without_renameat2_too(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # e.g. macOS, or a filesystem without it
    folder = vl.export_adapter(adapted(0.5), tmp_path / "p", format="peft")
    vl.export_adapter(adapted(0.7), folder, format="peft", overwrite=True)
    assert lora_a(folder) == pytest.approx(0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "", "unet\\..\\x"])
def test_pipeline_component_names_cannot_leave_the_output_folder(tmp_path, name):
    pytest.importorskip("diffusers")
    from tests.conftest import tiny_unet

    unet = tiny_unet()
    (tmp_path / "pipe").mkdir()
    with pytest.raises(vl.ConfigError, match=r"a pipeline component is a plain folder name"):
        vl.export_merged(unet, tmp_path / "out" / "merged", pipeline=tmp_path / "pipe", others={name: unet})
    with pytest.raises(vl.ConfigError, match=r"a pipeline component is a plain folder name"):
        vl.export_merged(unet, tmp_path / "out" / "merged", pipeline=tmp_path / "pipe", component=name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["pipe"]


def test_an_output_that_appears_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    real_save = files.save_file

    def racing_save(tensors, filename, metadata=None):  # another writer creates the output meanwhile
        real_save(tensors, filename, metadata=metadata)
        if "adapter_model" in filename:
            (tmp_path / "p").mkdir()
            (tmp_path / "p" / "theirs.txt").write_text("someone else's")
        else:
            (tmp_path / "a.safetensors").write_text("someone else's")

    monkeypatch.setattr(files, "save_file", racing_save)
    with pytest.raises(vl.AdapterFileError, match=r"a.safetensors: exists; pass overwrite=True"):
        vl.save_adapter(adapted(), tmp_path / "a.safetensors")
    with pytest.raises(vl.AdapterFileError, match=r"p: exists; pass overwrite=True"):
        vl.export_adapter(adapted(), tmp_path / "p", format="peft")
    assert snapshot(tmp_path) == {"a.safetensors": b"someone else's", "p/theirs.txt": b"someone else's"}
