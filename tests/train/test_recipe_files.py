"""Recipe files read as untrusted input: YAML that PyYAML itself trips on is one clear ConfigError."""

from __future__ import annotations

import pytest

import visionlora as vl
from visionlora.train import load_recipe

_BOMB = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    + "]"
)  # nine levels of nine aliases: 9**9 strings if anything walked it in full


@pytest.mark.parametrize(
    "text,message",
    [
        ("lora: " + "[" * 20_000 + "]" * 20_000, r"not valid YAML \(RecursionError"),
        ("lora: {rank: " + "9" * 5000 + "}\n", r"not valid YAML \(ValueError: Exceeds the limit \(4300 digits\)"),
        ("task: 2001-13-45\n", r"not valid YAML \(ValueError: month must be in 1..12"),
        (b"task: classifier\xff\n", r"not a UTF-8 text file"),
        ("task: !!python/object/apply:os.system ['echo pwned']\n", r"could not determine a constructor"),
        ("task: classifier\nmodel: " + _BOMB + "\n", r"model: expected a mapping, got list"),
        ("task: classifier\n" + "# padding\n" * 120_000, r"a recipe is at most 1048576"),
    ],
)
def test_malformed_recipe_files_are_refused_in_one_short_message(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(vl.ConfigError, match=message) as info:
        load_recipe(path)
    assert len(str(info.value)) < 1000  # a 9**8-element alias bomb is not repeated back


def test_an_optional_section_reads_as_its_dataclass_or_null_and_round_trips(tmp_path):
    from visionlora.train import dump_recipe

    text = (
        "task: diffusion-style\nmodel: {pipeline: /models/sd15}\ndata: {root: /data/style}\n"
        "lora: {targets: ['preset:unet-attention']}\n"
    )
    path = tmp_path / "r.yaml"
    path.write_text(text + "text_encoder_lora: {targets: ['*.q_proj'], rank: 2}\n")
    recipe = load_recipe(path)
    assert recipe.text_encoder_lora == vl.LoraConfig(targets=["*.q_proj"], rank=2)
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe
    path.write_text(text + "text_encoder_lora: null\n")
    assert load_recipe(path).text_encoder_lora is None
    path.write_text(text + "text_encoder_lora: {targets: ['*.q_proj'], rnak: 2}\n")
    with pytest.raises(vl.ConfigError, match=r"text_encoder_lora\.rnak: unknown key; did you mean 'rank'\?"):
        load_recipe(path)
