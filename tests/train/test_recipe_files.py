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
