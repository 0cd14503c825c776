"""Fuzzing the readers: mutated files of every format load, or are refused with a visionlora error.

Each example takes a valid file (see :func:`tests.io.adapter_mutations.seeds`), applies one to three
mutations (flipped bytes, truncation, header lies, recast/reshaped/renamed/poisoned tensors,
edited metadata and adapter configs, files that are folders or symlinks) and runs
``vl.load_adapter`` on a fresh model and ``visionlora inspect``. Anything but success or a
:class:`visionlora.VisionLoraError` fails, as does a refused load that changed the model or a
successful one that left NaN/Inf in it. ``scripts/fuzz.py`` runs the same mutators for longer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.io.adapter_mutations import FORMATS, HypothesisChooser, choice, mutate, run_case, seeds_of

EXAMPLES = 150  # per format; scripts/fuzz.py runs the same mutators for longer


@pytest.mark.parametrize("format", FORMATS)
@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(data=st.data())
def test_mutated_files_load_or_are_refused_with_a_visionlora_error(format, data, tmp_path_factory):
    chooser = HypothesisChooser(data)
    seed = choice(chooser, seeds_of(format))
    files, log = mutate(seed, chooser)
    preload = chooser.integer(0, 3) == 0  # sometimes the model already holds an adapter
    note = f"{seed.name}{' (preloaded)' if preload else ''}: " + "; ".join(log)
    data.draw(st.just(note), label="mutations")
    run_case(seed, files, tmp_path_factory.getbasetemp(), preload=preload)
