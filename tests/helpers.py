"""Helpers shared by tests: tiny configs, a tiny trained checkpoint, a counter of host reads."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode

from tests.conftest import TINY_PUNET

TINY_DATA = {"image_size": 32, "num_train": 16, "num_val": 8, "num_test": 8, "num_raters": 3, "batch_size": 8}


def tiny_config(root: Path, model: object = "punet", max_steps: int = 4, **trainer: object) -> Path:
    """Write a tiny fit config under ``root`` and return its path."""
    config = {
        "model": {"class_path": model, "init_args": dict(TINY_PUNET)} if isinstance(model, str) else model,
        "data": {"class_path": "probseg.data.SyntheticDataModule", "init_args": dict(TINY_DATA)},
        "trainer": {
            "default_root_dir": str(root / "run"),
            "max_steps": max_steps,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "val_check_interval": 2,
            "enable_model_summary": False,
            **trainer,
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class KillAtStep(Callback):
    """Used from YAML by the resume tests: SIGKILLs its own process right after optimizer step
    ``step``, with no cleanup and no final checkpoint, like a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordFirstDraw(Callback):
    """Used from YAML by the DDP test: each rank writes the first value it draws from torch's RNG
    in training and the ids of its first batch to ``{folder}/rank<r>.txt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            import torch

            Path(self.folder).mkdir(parents=True, exist_ok=True)
            value = float(torch.rand(()))
            Path(self.folder, f"rank{trainer.global_rank}.txt").write_text(f"{value}\n{','.join(batch['id'])}\n")


HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}
"""Tensor methods that read a value back to the host: on an accelerator, each one waits for the
device (a synchronisation)."""


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor value, with the line that asked for it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = traceback.extract_stack(limit=2)[0]
            self.reads.append(f"{func.__name__} at {Path(caller.filename).name}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def load_script(path: Path):
    """Import a benchmark script as a module (its folder on sys.path, for its sibling imports)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HoldUntilFile(Callback):
    """Used from YAML by the lock tests: after its first training step the run waits (holding its
    checkpoint lock) until ``path`` exists, at most ``timeout`` seconds."""

    def __init__(self, path: str, timeout: float = 120.0) -> None:
        self.path, self.timeout = path, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        deadline = time.monotonic() + self.timeout
        while trainer.global_step == 1 and not Path(self.path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class FailSavesFrom(Callback):
    """Used from YAML by the storage-fault tests: from optimizer step ``step`` on, every
    ``torch.save`` writes a few bytes and then fails as a full disk does (ENOSPC)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not getattr(torch.save, "fails", False):
            import errno

            def failing_save(obj, f, *args, **kwargs):
                if hasattr(f, "write"):
                    f.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            failing_save.fails = True
            torch.save = failing_save


class RecordDraws(Callback):
    """Used from YAML by the DDP resume test: each rank appends one JSON line per training step to
    ``{folder}/rank<r>.jsonl``: the step, the batch's ids, a digest of the augmented images and the
    loss, and the next value torch's global RNG would give at the step's start (drawn from a copy,
    so the run's own stream is untouched)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._draw: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        copy = torch.Generator()
        copy.set_state(torch.get_rng_state())
        self._draw = float(torch.rand((), generator=copy))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import hashlib
        import json

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = {"step": trainer.global_step - 1, "ids": list(batch["id"]), "draw": self._draw,
                "images": hashlib.sha256(batch["image"].detach().cpu().numpy().tobytes()).hexdigest(),
                "loss": float(loss)}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with open(Path(self.folder, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
