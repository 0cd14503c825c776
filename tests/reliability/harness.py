"""Kill writers with SIGKILL at random moments and check that no good output was lost.

A writer process writes one kind of output to the same place over and over, each time holding a
new generation number in every tensor, and counts the writes it finished. The parent kills it at a
random moment and then checks what is on disk: the output loads, holds one generation throughout
(no mix of two writes), at least the last finished one, and no temporary file looks like an output.
Used by tests/reliability/test_kill.py (a few kills) and scripts/stress.py (many).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import visionlora as vl
from visionlora.train.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, prune_checkpoints
from visionlora.train.checkpoint import save_checkpoint as write_step

WIDTH = 384  # the merged file is ~1.8 MB: a write takes milliseconds, so kills land inside writes


def plain_model() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def lora_model() -> nn.Module:
    return vl.apply_lora(plain_model(), vl.LoraConfig(targets=["0", "2"], rank=16, trainable=["4"]))


def fill(model: nn.Module, value: float, *, zero_b: bool = False) -> nn.Module:
    """Every parameter set to ``value`` (LoRA B to 0 with ``zero_b``, so a merge gives ``value`` everywhere)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(0.0 if zero_b and "lora_B" in name else value)
    return model


def generation(tensors: dict[str, torch.Tensor]) -> float:
    """The one value every floating-point tensor holds; raises if they hold more than one (a mixed write)."""
    values = {float(v.flatten()[0]) for v in tensors.values() if v.is_floating_point() and v.numel()}
    uniform = all(bool((v == v.flatten()[0]).all()) for v in tensors.values() if v.is_floating_point() and v.numel())
    if len(values) != 1 or not uniform:
        raise AssertionError(f"tensors hold several generations: {sorted(values)[:5]}")
    return values.pop()


class Writer:
    """One kind of output, written again and again; ``check`` raises if what is on disk is not a good output."""

    outputs: tuple[str, ...] = ()
    """The only non-hidden names the folder may hold."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, value: int) -> None:
        raise NotImplementedError

    def read(self) -> float:
        """The generation on disk (checking that it loads the way users load it)."""
        raise NotImplementedError

    def check(self, finished: int) -> None:
        names = sorted(p.name for p in self.folder.iterdir() if not p.name.startswith("."))
        if names != sorted(self.outputs):
            raise AssertionError(f"folder holds {names}, expected {sorted(self.outputs)}")
        found = self.read()
        if found < finished:  # a finished write may be followed by one more, killed after its rename
            raise AssertionError(f"generation {found} on disk, but write {finished} had finished")


class AdapterWriter(Writer):
    outputs = ("adapter.safetensors",)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.model = lora_model()

    def write(self, value: int) -> None:
        vl.save_adapter(fill(self.model, value), self.folder / "adapter.safetensors", overwrite=True)

    def read(self) -> float:
        return generation(vl.read_adapter(self.folder / "adapter.safetensors").tensors)


class MergedWriter(Writer):
    outputs = ("merged.safetensors",)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.model = lora_model()

    def write(self, value: int) -> None:
        vl.export_merged(fill(self.model, value, zero_b=True), self.folder / "merged.safetensors", overwrite=True)

    def read(self) -> float:
        state = load_file(self.folder / "merged.safetensors")
        plain_model().load_state_dict(state)  # strict: the plain architecture's keys and shapes
        return generation(state)


class PeftWriter(Writer):
    """A folder output (written through a staging folder that is swapped in)."""

    outputs = ("adapter-peft",)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.model = lora_model()

    def write(self, value: int) -> None:
        vl.export_adapter(fill(self.model, value), self.folder / "adapter-peft", format="peft", overwrite=True)

    def read(self) -> float:
        return generation(vl.read_adapter(self.folder / "adapter-peft").tensors)


class UnetFolderWriter(Writer):
    """A merged diffusers model folder (needs diffusers)."""

    outputs = ("merged-unet",)

    def __init__(self, folder: Path) -> None:
        from tests.conftest import tiny_unet

        super().__init__(folder)
        self.model = vl.apply_lora(tiny_unet(), vl.LoraConfig(targets="preset:unet-attention", rank=4))

    def write(self, value: int) -> None:
        vl.export_merged(fill(self.model, value, zero_b=True), self.folder / "merged-unet", overwrite=True)

    def read(self) -> float:
        import diffusers

        unet = diffusers.UNet2DConditionModel.from_pretrained(self.folder / "merged-unet")
        return generation(dict(unet.state_dict()))


class CheckpointWriter(Writer):
    """Training checkpoints: steps 1, 2, 3, 2, 3, 4, 3, ... so steps are also rewritten (as by a resumed run)
    and newer ones pruned, with ``keep_checkpoints`` 2."""

    outputs = ("checkpoints",)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.model, self.optimizer = self._trainer()

    @staticmethod
    def _trainer() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = lora_model()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable)
        for p in trainable:
            p.grad = torch.ones_like(p)
        optimizer.step()  # so the optimizer has state to save
        return model, optimizer

    def write(self, value: int) -> None:
        step = value // 3 + value % 3 + 1
        root = self.folder / "checkpoints"
        fill(self.model, value)
        write_step(root, step, model=self.model, optimizer=self.optimizer, state={"step": step, "generation": value})
        prune_checkpoints(root, 2, step)

    def read(self) -> float:
        latest = latest_checkpoint(self.folder)  # what --resume latest picks
        for folder in checkpoint_dirs(self.folder / "checkpoints"):
            model, optimizer = self._trainer()
            state = load_checkpoint(folder, model=model, optimizer=optimizer)
            trained = {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("4.")}
            if generation(trained) != state["generation"]:
                raise AssertionError(f"{folder}: tensors of generation {generation(trained)}, state.json says {state}")
        return float(json.loads((latest / "state.json").read_text())["generation"])

    def check(self, finished: int) -> None:
        super().check(0)  # the newest step need not be the last written one (a kill before pruning)


WRITERS: dict[str, type[Writer]] = {
    "adapter file (save_adapter)": AdapterWriter,
    "merged file (export_merged)": MergedWriter,
    "PEFT folder (export_adapter)": PeftWriter,
    "training checkpoint": CheckpointWriter,
    "merged UNet folder (export_merged)": UnetFolderWriter,
}


def write_forever(kind: str, folder: str, finished: Any, ready: Any) -> None:
    """The writer process: write generation 1, 2, ... of ``kind`` until killed."""
    torch.set_num_threads(1)
    writer = WRITERS[kind](Path(folder))
    ready.send(True)
    for value in itertools.count(finished.value + 1):
        writer.write(value)
        finished.value = value


@dataclass
class Outcome:
    """What the kills of one writer kind did."""

    kind: str
    attempts: int = 0
    survived: int = 0
    lost: int = 0
    writes: int = 0
    leftovers: int = 0
    problems: list[str] = field(default_factory=list)


PRELOAD = ["torch._dynamo", "tests.reliability.harness", "visionlora.train.classifier", "tests.train.conftest"]
"""What the forkserver imports once (torch._dynamo: imported by a writer's first optimizer, most of a second)."""


def context(extra: tuple[str, ...] = ()) -> Any:
    """A forkserver that has imported torch and visionlora once, so each writer starts in milliseconds.

    ``extra`` modules are preloaded too, if the forkserver has not started yet.
    """
    root = str(Path(__file__).resolve().parents[2])  # the forkserver does not get sys.path (Python < 3.12)
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *extra])
    return ctx


def _kill_after(ctx: Any, target: Any, args: tuple[Any, ...], delay: float) -> None:
    """Start ``target(*args, ready)``, wait until it sends on ``ready``, let it run ``delay`` seconds, SIGKILL it.

    A pipe and a lock-free shared value (not an Event): a killed process leaks no semaphores.
    """
    receive, ready = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(*args, ready), daemon=True)
    process.start()
    ready.close()
    while not receive.poll(0.05):
        if not process.is_alive():
            break
    try:
        receive.recv()
    except EOFError:  # the pipe closed: the process ended
        process.join()
        raise RuntimeError(f"{target.__name__}: exited (code {process.exitcode}) before it was ready") from None
    time.sleep(delay)
    process.kill()
    process.join()
    receive.close()


def _hidden(folder: Path) -> int:
    return sum(1 for p in folder.rglob(".*") if p.parent == folder or p.parent.name == "checkpoints")


def kill_writers(kind: str, folder: Path, kills: int, rng: random.Random, max_delay: float = 0.25) -> Outcome:
    """Start the ``kind`` writer ``kills`` times in ``folder``, SIGKILL it after a random delay, check the output."""
    ctx = context()
    folder.mkdir(parents=True, exist_ok=True)
    WRITERS[kind](folder).write(0)  # the good output there is before any kill
    finished = ctx.Value("q", 0, lock=False)
    outcome = Outcome(kind)
    for _ in range(kills):
        _kill_after(ctx, write_forever, (kind, str(folder), finished), rng.uniform(0.0, max_delay))
        outcome.attempts += 1
        try:
            WRITERS[kind](folder).check(finished.value)
        except Exception as exc:  # any failure to load counts as a lost file
            outcome.lost += 1
            outcome.problems.append(f"{type(exc).__name__}: {exc}")
        else:
            outcome.survived += 1
    outcome.writes = finished.value
    outcome.leftovers = _hidden(folder)
    return outcome


def train_recipe(data: Path, **train: Any) -> Any:
    from tests.train.conftest import tiny_recipe
    from visionlora.train.recipe import parse_recipe

    return parse_recipe(tiny_recipe(data, **train))


def train_forever(folder: str, data: str, checkpoints: Any, ready: Any) -> None:
    """The training process: a long classifier run with a checkpoint every step (resumed if one exists)."""
    import visionlora.train.loop as loop
    from visionlora.train import run_recipe

    torch.set_num_threads(1)
    save = loop.save_checkpoint

    def counted(*args: Any, **kwargs: Any) -> Path:
        written = save(*args, **kwargs)
        checkpoints.value += 1
        return written

    loop.save_checkpoint = counted  # type: ignore[assignment]  # count the checkpoints that were completed
    resume = "latest" if checkpoint_dirs(Path(folder) / "checkpoints") else None
    ready.send(True)
    recipe = train_recipe(Path(data), max_steps=10_000, checkpoint_every=1)
    run_recipe(recipe, output=folder, resume=resume, progress=False)


def kill_training(folder: Path, data: Path, kills: int, rng: random.Random, max_delay: float = 2.0) -> Outcome:
    """Kill a training run at a random moment ``kills`` times; each time ``--resume latest`` must find a
    complete checkpoint (once one was written) and a resumed run must finish with a readable adapter."""
    from visionlora.train import run_recipe

    ctx = context()
    outcome = Outcome("training run, then --resume latest")
    for _ in range(kills):
        checkpoints = ctx.Value("q", 0, lock=False)
        _kill_after(ctx, train_forever, (str(folder), str(data), checkpoints), rng.uniform(0.2, max_delay))
        outcome.attempts += 1
        outcome.writes += checkpoints.value
        try:
            if not checkpoint_dirs(folder / "checkpoints"):
                if checkpoints.value:
                    raise AssertionError(f"{checkpoints.value} checkpoints were written, none is left")
                outcome.survived += 1  # killed before the first checkpoint: nothing to resume, nothing lost
                continue
            step = json.loads((latest_checkpoint(folder) / "state.json").read_text())["step"]
            recipe = train_recipe(data, max_steps=step + 1, checkpoint_every=1)
            metrics = run_recipe(recipe, output=folder, resume="latest", progress=False)  # takes over the dead lock
            if metrics["steps"] != step + 1:
                raise AssertionError(f"resumed from step {step} but ended at {metrics['steps']}")
            vl.read_adapter(folder / "adapter.safetensors")  # complete and finite
        except Exception as exc:
            outcome.lost += 1
            outcome.problems.append(f"{type(exc).__name__}: {exc}")
        else:
            outcome.survived += 1
    outcome.leftovers = _hidden(folder)
    return outcome


@contextlib.contextmanager
def poisoned(bad: Callable[[int], bool]) -> Iterator[list[int]]:
    """In the classifier and diffusion runners, training forward pass ``i`` gives NaN outputs where ``bad(i)``.

    Yields the list of poisoned pass indices (filled as training goes).
    """
    import visionlora.train.classifier as classifier
    import visionlora.train.diffusion as diffusion

    hit: list[int] = []
    calls = itertools.count()

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training:
            return None
        index = next(calls)
        if not bad(index):
            return None
        hit.append(index)
        if isinstance(output, torch.Tensor):
            return output * float("nan")
        return type(output)(sample=output.sample * float("nan"))  # a diffusers UNet's output

    build, load = classifier.build_classifier, diffusion.load_pipeline

    def build_poisoned(spec: Any) -> nn.Module:
        model = build(spec)
        model.register_forward_hook(hook)
        return model

    def load_poisoned(spec: Any) -> Any:
        pipe = load(spec)
        pipe.unet.register_forward_hook(hook)
        return pipe

    classifier.build_classifier, diffusion.load_pipeline = build_poisoned, load_poisoned  # type: ignore[assignment]
    try:
        yield hit
    finally:
        classifier.build_classifier, diffusion.load_pipeline = build, load  # type: ignore[assignment]


def isolated_nan_run(folder: Path, data: Path, rng: random.Random, steps: int = 8, limit: int = 3) -> Outcome:
    """A classifier run with NaN outputs at random training passes, never ``limit`` in a row: it must make
    all its steps and write a finite adapter."""
    from visionlora.train import run_recipe

    bad = set()
    for index in range(3 * steps):
        if rng.random() < 0.3 and not all(i in bad for i in range(index - limit + 1, index)):
            bad.add(index)
    outcome = Outcome("NaN/Inf steps (isolated)", attempts=1)
    with poisoned(lambda i: i in bad) as hit:
        recipe = train_recipe(data, max_steps=steps, max_nonfinite_steps=limit)
        metrics = run_recipe(recipe, output=folder, progress=False)
    outcome.writes = len(hit)
    try:
        if metrics["steps"] != steps:
            raise AssertionError(f"{metrics['steps']} steps made, {steps} asked for")
        vl.read_adapter(folder / "adapter.safetensors")  # refuses NaN/Inf
        state = load_file(folder / "merged.safetensors")
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise AssertionError("merged.safetensors holds NaN/Inf")
    except Exception as exc:
        outcome.lost += 1
        outcome.problems.append(f"{type(exc).__name__}: {exc}")
    else:
        outcome.survived += 1
    return outcome


def nan_streak_run(folder: Path, data: Path, rng: random.Random, limit: int = 3) -> Outcome:
    """NaN from a random training pass on: the run must stop with TrainingError naming its newest
    checkpoint, which must be finite and resumable."""
    from visionlora.train import run_recipe

    start = rng.randrange(2, 6)
    outcome = Outcome("NaN/Inf streak (run stops)", attempts=1)
    try:
        with poisoned(lambda i: i >= start) as hit:
            recipe = train_recipe(data, max_steps=50, checkpoint_every=1, max_nonfinite_steps=limit)
            run_recipe(recipe, output=folder, progress=False)
        raise AssertionError("the run did not stop")
    except vl.TrainingError as exc:
        outcome.writes = len(hit)
        try:
            latest = latest_checkpoint(folder)
            if f"the last good checkpoint is at {latest}" not in str(exc) or (folder / "adapter.safetensors").exists():
                raise AssertionError(f"unexpected stop: {exc}") from None
            step = json.loads((latest / "state.json").read_text())["step"]
            resumed = train_recipe(data, max_steps=step + 1, checkpoint_every=1)
            run_recipe(resumed, output=folder, resume="latest", progress=False)
            vl.read_adapter(folder / "adapter.safetensors")
        except Exception as problem:
            outcome.lost += 1
            outcome.problems.append(f"{type(problem).__name__}: {problem}")
        else:
            outcome.survived += 1
    return outcome
