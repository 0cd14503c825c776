"""LoraConfig: strict dict/YAML loading, type and range checks, round trips."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import visionlora as vl
from visionlora.config import pattern_matches


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(vl.ConfigError, match=r"rnak: unknown key; did you mean 'rank'\?"):
        vl.LoraConfig.from_dict({"targets": "fc", "rnak": 4})


def test_missing_required_key():
    with pytest.raises(vl.ConfigError, match=r"missing required key.*targets"):
        vl.LoraConfig.from_dict({"rank": 4})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rank", "4", r"rank: expected int, got str '4'"),
        ("rank", True, r"rank: expected int, got bool"),
        ("rank", 0, r"rank: rank 0 is invalid; ranks are integers from 1 to 65536"),
        ("alpha", -1.0, r"alpha: alpha -1.0 is invalid"),
        ("alpha", float("nan"), r"alpha: alpha nan is invalid"),
        ("dropout", 1.0, r"dropout: 1.0 is out of range"),
        ("bias", "some", r"bias: expected 'none' \| 'all' \| 'lora_only', got str 'some'"),
        ("init", "xavier", r"init: expected 'kaiming' \| 'gaussian'"),
        ("target_types", ["BatchNorm2d"], r"target_types: expected list\['Linear' \| 'Conv1d'"),
        ("rank_pattern", {"layer4.*": 0}, r"rank_pattern\['layer4.\*'\]: rank 0 is invalid"),
        ("targets", [], r"targets: empty"),
        ("targets", ["re:("], r"targets: 're:\(' is not a valid regular expression"),
    ],
)
def test_bad_values_name_the_field_and_what_is_valid(field, value, message):
    data = {"targets": "fc", field: value}
    with pytest.raises(vl.ConfigError, match=message):
        vl.LoraConfig.from_dict(data)
    with pytest.raises(vl.ConfigError, match=message):
        vl.LoraConfig(**data)


def test_config_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        vl.LoraConfig(targets="fc", rank=-2)


configs = st.builds(
    vl.LoraConfig,
    targets=st.lists(st.sampled_from(["layer4.*", "fc", "re:.*conv[12]", "0"]), min_size=1, max_size=3),
    rank=st.integers(1, 64),
    alpha=st.floats(0.5, 64),
    rank_pattern=st.dictionaries(st.sampled_from(["layer4.0.*", "fc"]), st.integers(1, 32), max_size=2),
    alpha_pattern=st.dictionaries(st.sampled_from(["layer4.1.*"]), st.floats(1, 8), max_size=1),
    dropout=st.floats(0, 0.9),
    init=st.sampled_from(["kaiming", "gaussian"]),
    rslora=st.booleans(),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    trainable=st.lists(st.sampled_from(["fc", "head.*"]), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_configs_round_trip_through_dict_and_yaml(cfg):
    assert vl.LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert vl.LoraConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_single_target_string_becomes_a_list_and_int_alpha_a_float():
    cfg = vl.LoraConfig(targets="layer4.*", alpha=8)
    assert cfg.targets == ["layer4.*"] and isinstance(cfg.alpha, float)


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("0", "0", True),
        ("0", "10", False),
        ("layer1.*", "layer10.conv", False),
        ("layer4.*", "layer4.0.conv1", True),
        ("*.to_q", "down.0.attn.to_q", True),
        ("re:layer4\\.\\d\\.conv[12]", "layer4.2.conv1", True),
        ("re:conv", "layer4.0.conv1", False),  # full match, not search
    ],
)
def test_pattern_grammar(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected
