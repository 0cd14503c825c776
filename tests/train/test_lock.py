"""Two training runs pointed at one output folder: the second is refused while the first holds the folder;
a lock left by a dead run is taken over; a fresh run does not silently replace an earlier run."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest

import visionlora as vl
from tests.reliability.harness import context, train_forever, train_recipe
from visionlora.train import run_recipe
from visionlora.train.checkpoint import checkpoint_dirs
from visionlora.train.lock import LOCK_NAME

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")


def _lock(folder, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (folder / LOCK_NAME).write_text(json.dumps(holder))


def test_a_second_run_is_refused_while_a_live_run_trains_in_the_folder(digits_root, tmp_path):
    ctx = context()
    out = tmp_path / "run"
    receive, ready = ctx.Pipe(duplex=False)
    first = ctx.Process(target=train_forever, args=(str(out), str(digits_root), ctx.Value("q", 0, lock=False), ready))
    first.start()
    try:
        receive.poll(120)
        while not (out / LOCK_NAME).exists():
            assert first.is_alive(), "the first run ended before it took the folder"
            first.join(0.05)
        with pytest.raises(vl.TrainingError, match=rf"{out}: another training run \(pid {first.pid} on "):
            run_recipe(train_recipe(digits_root, max_steps=1), output=out, resume="latest", progress=False)
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # the refused run left it alone
    finally:
        first.kill()
        first.join()


def test_a_lock_left_by_a_dead_run_is_taken_over_and_its_leftovers_removed(digits_root, tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: no process has this id now
    _lock(tmp_path / "run", dead.pid)
    leftovers = [".adapter.safetensors.k2j_9xq1.tmp", ".tmpAbC123", ".merged.ab12cd34"]  # of killed writes
    for name in [*leftovers, ".gitignore"]:
        (tmp_path / "run" / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="visionlora.train.lock"):
        metrics = run_recipe(train_recipe(digits_root, max_steps=1), output=tmp_path / "run", progress=False)
    assert metrics["steps"] == 1
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == [".gitignore"]


def test_a_lock_held_on_another_host_or_unreadable_is_refused(digits_root, tmp_path):
    recipe = train_recipe(digits_root, max_steps=1)
    _lock(tmp_path / "a", os.getpid(), host="gpu-node-7")
    with pytest.raises(vl.TrainingError, match=r"pid \d+ on gpu-node-7, started 2026-01-01 00:00:00"):
        run_recipe(recipe, output=tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).write_text("")
    with pytest.raises(vl.TrainingError, match=r"\.visionlora\.lock exists but does not name a run"):
        run_recipe(recipe, output=tmp_path / "b", progress=False)


def test_the_lock_is_released_when_the_run_fails(digits_root, tmp_path):
    recipe = train_recipe(digits_root, max_steps=1)
    recipe.data.root = str(tmp_path / "nowhere")
    with pytest.raises(vl.ConfigError, match="nowhere"):
        run_recipe(recipe, output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_fresh_run_does_not_replace_an_earlier_run_unless_asked(digits_root, tmp_path):
    out = tmp_path / "run"
    run_recipe(train_recipe(digits_root, max_steps=3, checkpoint_every=1), output=out, progress=False)
    adapter = (out / "adapter.safetensors").read_bytes()
    message = r"holds an earlier run \(adapter.safetensors, metrics.json, checkpoints/\); continue it with --resume"
    with pytest.raises(vl.ConfigError, match=message):
        run_recipe(train_recipe(digits_root, max_steps=1), output=out, progress=False)
    assert (out / "adapter.safetensors").read_bytes() == adapter
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-000001", "step-000002"]
    run_recipe(train_recipe(digits_root, max_steps=1, seed=1), output=out, progress=False, overwrite=True)
    assert (out / "adapter.safetensors").read_bytes() != adapter
    assert checkpoint_dirs(out / "checkpoints") == []  # the earlier run's, removed: --resume cannot mix runs


def test_the_cli_train_overwrite_flag(digits_root, tmp_path, capsys):
    from visionlora.cli import main
    from visionlora.train import dump_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(train_recipe(digits_root, max_steps=1)))
    out = str(tmp_path / "run")
    assert main(["train", str(path), "--output", out]) == 0
    assert main(["train", str(path), "--output", out]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(["train", str(path), "--output", out, "--overwrite"]) == 0
