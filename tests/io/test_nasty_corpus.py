"""The corpus of nasty files (``tests/data/nasty/``, made by ``scripts/make_nasty_corpus.py``).

Every file is refused by ``load_adapter`` with a visionlora error that names it, the model is left
bit for bit as it was (also when it already holds an adapter), ``visionlora inspect`` refuses it
in one line (or describes it, where only its fit to a model is wrong), and no pickle in it is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import visionlora as vl
from tests.io.adapter_mutations import fresh_model, materialize, same, seeds, snapshot
from visionlora.cli import main
from visionlora.io.files import MAX_HEADER_BYTES
from visionlora.io.weights import read_state_dict

NASTY = Path(__file__).resolve().parents[1] / "data" / "nasty"
MANIFEST = json.loads((NASTY / "manifest.json").read_text())


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """The file the corpus' pickles write if anything unpickles them."""
    path = tmp_path / "unpickled-marker"
    monkeypatch.setenv("VISIONLORA_TEST_MARKER", str(path))
    return path


def _preloaded(kind: str, tmp_path: Path) -> torch.nn.Module:
    """A fresh ``kind`` model that already holds a valid adapter (under the name 'first')."""
    seed = next(s for s in seeds() if s.model == kind and s.format == "visionlora")
    materialize(dict(seed.files), tmp_path / "valid")
    return vl.load_adapter(fresh_model(kind), tmp_path / "valid" / seed.entry, adapter_name="first")


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_nasty_file_is_refused_by_name_and_leaves_the_model_as_it_was(name, tmp_path, marker, capsys):
    entry = MANIFEST[name]
    path = NASTY / entry["path"]
    for model in (fresh_model(entry["model"]), _preloaded(entry["model"], tmp_path)):
        before = snapshot(model)
        with pytest.raises(vl.VisionLoraError, match=entry["load"]) as info:
            vl.load_adapter(model, path, adapter_name="second")
        assert str(path) in str(info.value)
        assert same(before, snapshot(model))
    status = main(["inspect", str(path)])
    err = capsys.readouterr().err
    if entry["inspect"] is None:  # well-formed; only loading it onto the model shows what is wrong
        assert status == 0
    else:
        assert status == 2 and str(path) in err and len(err.strip().splitlines()) <= 3, err
    assert not marker.exists()


def test_the_corpus_pickles_would_run_code_if_unpickled(marker):
    """The control for the tests above: their marker file really is written by unpickling."""
    pickle.loads((NASTY / "peft-pickle-only" / "adapter" / "adapter_model.bin").read_bytes())
    assert marker.read_text() == "unpickled"
    os.unlink(marker)
    torch.load(NASTY / "pickle.pt", weights_only=False)
    assert marker.read_text() == "unpickled"


def test_a_pt_base_with_a_pickle_payload_is_refused_without_running_it(marker):
    with pytest.raises(vl.AdapterFileError, match=r"pickle.pt: not a readable weights-only checkpoint"):
        read_state_dict(NASTY / "pickle.pt")
    with pytest.raises(vl.AdapterFileError, match=r"not a valid safetensors file"):
        read_state_dict(NASTY / "pickle-named-safetensors.safetensors")
    assert not marker.exists()


def test_a_header_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "huge-header.safetensors"
    save_file({"w": torch.zeros(1)}, path, {"visionlora": "x" * (MAX_HEADER_BYTES + 1)})
    with pytest.raises(
        vl.AdapterFileError, match=rf"huge-header.safetensors: .*visionlora reads headers up to {MAX_HEADER_BYTES}"
    ):
        vl.load_adapter(fresh_model("fuzznet"), path)


def test_an_oversized_peft_config_is_refused_before_it_is_parsed(tmp_path):
    seed = next(s for s in seeds() if s.name == "peft")
    materialize(dict(seed.files), tmp_path)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "notes": "x" * 5_000_000}))
    with pytest.raises(vl.AdapterFileError, match=r"adapter_config.json: is 50\d+ bytes; an adapter config is at most"):
        vl.load_adapter(fresh_model("fuzznet"), tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["loop", "dangling", "fifo"])
def test_paths_that_are_not_regular_files_are_refused(tmp_path, kind):
    path = tmp_path / "odd.safetensors"
    if kind == "loop":
        path.symlink_to(path.name)
    elif kind == "dangling":
        path.symlink_to("missing.safetensors")
    else:
        os.mkfifo(path)  # reading it would block forever
    model = fresh_model("fuzznet")
    before = snapshot(model)
    with pytest.raises(vl.AdapterFileError, match=r"odd.safetensors: no such file"):
        vl.load_adapter(model, path)
    assert same(before, snapshot(model))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s["fc.bias"].fill_(float("nan")), r"tensor 'fc.bias' holds NaN or Inf"),
        (
            lambda s: s.__setitem__("fc.bias", torch.full((1000,), 1e300, dtype=torch.float64)),
            r"tensor 'fc.bias' holds NaN",
        ),
        (
            lambda s: s.__setitem__("conv1.weight", s["conv1.weight"].to(torch.int8)),
            r"tensor 'conv1.weight' is torch.int8",
        ),
    ],
)
def test_a_base_weights_file_with_bad_values_is_refused_by_tensor(tmp_path, change, message):
    import torchvision

    from visionlora.io.weights import load_base

    state = torchvision.models.resnet18().state_dict()
    change(state)
    torch.save(state, tmp_path / "base.pt")
    with pytest.raises(vl.AdapterFileError, match=rf"base.pt: {message}"):
        load_base(str(tmp_path / "base.pt"), arch="resnet18")
