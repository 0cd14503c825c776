"""The format table: every record reads back what it writes, and the table is the one list of formats."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora
from visionlora.io.formats import FORMAT_TABLE, AdapterFormat, open_adapter


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(64, 5))


def test_the_format_names_recipes_accept_are_the_table_s():
    assert typing.get_args(AdapterFormat) == tuple(FORMAT_TABLE)
    assert tuple(FORMAT_TABLE) == vl.io.FORMATS


@pytest.mark.parametrize("name", list(FORMAT_TABLE))
def test_every_format_is_detected_read_and_loaded_as_written(name, tmp_path):
    model = vl.apply_lora(
        _model(), vl.LoraConfig(targets=["0", "2", "4"], rank=2, alpha=5, rank_pattern={"4": 3}, alpha_pattern={"2": 1})
    )
    randomize_lora(model)
    fmt = FORMAT_TABLE[name]
    path = vl.export_adapter(model, tmp_path / fmt.output_name(), format=name)
    found, _ = open_adapter(path)
    assert found is fmt
    record = vl.read_adapter(path)
    assert record.format == name
    assert {n: (s.rank, s.alpha) for n, s in record.layers.items()} == {"0": (2, 5.0), "2": (2, 1.0), "4": (3, 5.0)}
    loaded = vl.load_adapter(_model(), path).eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert_rel_close(loaded(x), model.eval()(x), 1e-5)


def test_a_part_and_an_added_text_encoder_in_one_export_are_refused(tmp_path):
    model = vl.apply_lora(_model(), vl.LoraConfig(targets="4", rank=2))
    with pytest.raises(vl.ConfigError, match="component= exports one part of a pipeline file; text_encoder= adds"):
        vl.export_adapter(model, tmp_path / "a.safetensors", format="kohya", text_encoder=model, component="unet")
    assert not (tmp_path / "a.safetensors").exists()
