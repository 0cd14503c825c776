"""SIGKILL at random (seeded) moments while visionlora writes: the previous good output is always intact
and loadable, no temporary file is taken for an output, and ``--resume latest`` finds a valid checkpoint.

Writers run in processes forked from a forkserver that has imported torch once (see harness.py), so a
kill costs a fraction of a second; scripts/stress.py runs the same with many more kills.
"""

from __future__ import annotations

import multiprocessing as mp
import random

import pytest

from tests.reliability.harness import WRITERS, kill_training, kill_writers
from tests.train.conftest import digit_folder
from visionlora.train.checkpoint import checkpoint_dirs, latest_checkpoint

pytestmark = pytest.mark.skipif(
    "forkserver" not in mp.get_all_start_methods(), reason="the kill harness forks its writers from a forkserver"
)

KINDS = [kind for kind in WRITERS if "UNet" not in kind]  # the UNet folder (diffusers) is left to scripts/stress.py


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_writer_never_loses_the_previous_output(kind, tmp_path):
    outcome = kill_writers(kind, tmp_path / "out", kills=4, rng=random.Random(f"kill {kind}"))
    assert outcome.lost == 0, outcome.problems
    assert outcome.survived == 4 and outcome.writes >= 4  # the kills cut into a stream of writes


def test_a_killed_training_run_resumes_from_its_latest_checkpoint(tmp_path):
    pytest.importorskip("accelerate")
    data = digit_folder(tmp_path / "data")
    outcome = kill_training(tmp_path / "run", data, kills=2, rng=random.Random("kill training"), max_delay=1.5)
    assert outcome.lost == 0, outcome.problems
    assert outcome.survived == 2


def test_a_half_deleted_or_half_copied_step_folder_is_not_a_checkpoint(tmp_path):
    from tests.reliability.harness import CheckpointWriter

    writer = CheckpointWriter(tmp_path)
    for generation in range(3):
        writer.write(generation)  # steps 1, 2, 3
    (tmp_path / "checkpoints" / "step-000003" / "trainable.safetensors").unlink()  # e.g. an rmtree cut short
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-000002"]
