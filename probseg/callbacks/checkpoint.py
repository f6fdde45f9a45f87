"""Checkpointing with a predictable place, exact resumption and one writer per run folder.

:class:`RunCheckpoint` writes ``{trainer.default_root_dir}/checkpoints``: ``last.ckpt`` at every
save (every ``every_n_train_steps`` steps and every epoch end) and the best by ``val/loss``. Its
state in the checkpoint carries the random number generators (torch CPU and CUDA, numpy, Python),
so ``probseg fit --config CFG --ckpt_path last`` continues a killed run with the draws it would
have made: together with the optimizer, loops, callbacks and the data order (restored by
Lightning and by :class:`probseg.data.base.ProbSegDataModule`), the resumed run ends with the
weights of an uninterrupted one. Under DDP every rank's generators are gathered into the
checkpoint and each rank restores its own; resumed on another number of processes, rank 0's are
restored and the other ranks draw new streams (with a warning).

While a run trains it holds an exclusive ``fcntl.flock`` on ``checkpoints/.lock`` (which names its
process id): of several runs started on one folder at once exactly one trains, and the others stop
with :class:`RunLockedError` naming the owner, on every DDP rank. The kernel drops the lock when its
process dies, so a crashed run's leftover file is taken over. Where ``fcntl`` does not exist
(Windows) an exclusive create of the file stands in, with the same messages.

Checkpoints are written atomically (:class:`AtomicCheckpointIO`): to a temporary file in the same
folder, flushed to disk, then renamed over the old one, so a crash or a full disk mid-save never
leaves a truncated ``last.ckpt``: the previous good file stays until the new one is complete, and a
failed save stops the run with :class:`CheckpointWriteError` naming the file and the cause.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

try:
    import fcntl
except ImportError:  # Windows: an exclusive create stands in
    fcntl = None

LOCK_NAME = ".lock"
RNG_KEY = "probseg_rng"
RNG_RANKS_KEY = "probseg_rng_ranks"


def rng_state() -> dict[str, Any]:
    """Every global random generator's state, as plain tensors and lists (weights_only-safe)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state(random.getstate())}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


class RunLockedError(RuntimeError):
    """Another live run holds the checkpoint folder."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous file at that path is intact)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, made atomic on local disks: serialize to
    ``.<name>.<pid>.tmp`` in the target folder, flush and fsync it, ``os.replace`` it over the target
    and fsync the folder. (Lightning's own save goes through a temporary file in the system's temp
    folder and a move, which is a copy when that folder is on another disk.) Remote paths
    (``s3://`` ...) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = str(path)
        if "://" in target or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        target_path = Path(target)
        tmp = target_path.with_name(f".{target_path.name}.{os.getpid()}.tmp")
        try:
            target_path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            reason = err.strerror or str(err)
            raise CheckpointWriteError(err.errno, f"could not write the checkpoint {target_path} ({reason}); "
                                       f"{'the previous file is kept' if target_path.exists() else 'no earlier file'}"
                                       ", so a resume loses at most this save interval") from err
        _fsync_folder(target_path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps ``last.ckpt``, resumes exactly and guards its folder.

    Without an explicit ``dirpath`` it writes to ``{default_root_dir}/checkpoints`` instead of a
    logger-dependent folder. A later run in the same folder replaces ``last.ckpt`` (no ``-v1``
    copies); a concurrent one is refused.

    Args:
        monitor: metric selecting the best checkpoint (default "val/loss").
        save_last: keep ``last.ckpt`` (default True).
        every_n_train_steps: also save every n optimizer steps, so a killed run loses at most
            that many (default: at epoch ends only).
        (other arguments as in Lightning's ModelCheckpoint)
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = "epoch{epoch:03d}-step{step:06d}",
        monitor: str | None = "val/loss",
        save_last: bool | None = True,
        save_top_k: int = 1,
        mode: str = "min",
        every_n_train_steps: int | None = None,
        auto_insert_metric_name: bool = False,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        # Explicit defaults (not setdefault): YAML configs instantiate with every parameter given.
        # enable_version_counter=False: a new run in the same folder replaces last.ckpt instead of
        # writing last-v1.ckpt beside an out-of-date last.ckpt.
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, save_last=save_last,
                         save_top_k=save_top_k, mode=mode, every_n_train_steps=every_n_train_steps,
                         auto_insert_metric_name=auto_insert_metric_name,
                         enable_version_counter=enable_version_counter, **kwargs)
        self._lock: Path | None = None
        self._lock_fd: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make its saves atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit":
            # Rank 0 takes the lock and tells every rank the outcome, so all stop together.
            refused = None
            if trainer.is_global_zero:
                try:
                    self._acquire(Path(self.dirpath))
                except RunLockedError as err:
                    refused = str(err)
            refused = trainer.strategy.broadcast(refused, src=0)
            if refused:
                raise RunLockedError(refused)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning postpones step saves until the monitored metric exists (after the first
        # validation): last.ckpt is written at every interval regardless, so a crash in a long
        # first epoch loses at most one interval.
        every = self._every_n_train_steps
        if (every >= 1 and self.save_last and trainer.global_step % every == 0
                and self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run that stops between saves (max_steps mid-epoch, early stopping) still leaves its
        # final state in last.ckpt; a fast_dev_run never touches a real run's checkpoints.
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.sanity_checking and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)  # while still locked: a waiting run retries on a new file
            self._lock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    @staticmethod
    def _refusal(folder: Path, owner: str) -> RunLockedError:
        return RunLockedError(
            f"another probseg run (process {owner or 'unknown'}) is writing checkpoints to {folder}; give this run "
            "its own --trainer.default_root_dir, or wait for that one to finish")

    def _acquire(self, folder: Path) -> None:
        """Take the folder's lock for this run's life, or raise :class:`RunLockedError`."""
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / LOCK_NAME
        if fcntl is None:
            return self._acquire_by_create(folder, lock)
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live run
                owner = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise self._refusal(folder, owner) from None
            try:
                current = os.stat(lock).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # the holder removed this file as we opened it: again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._lock, self._lock_fd = lock, fd
            return None

    def _acquire_by_create(self, folder: Path, lock: Path) -> None:
        """Without flock: an exclusive create, taking over a file whose process is gone."""
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and _pid_alive(owner):
                    raise self._refusal(folder, str(owner)) from None
                lock.unlink(missing_ok=True)  # left by a process that is gone (or by this one)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._lock = lock
            return

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Under fixed keys, so a resume with other checkpoint settings (another state key) still
        # restores the generators. RNG_KEY keeps rank 0's state in the one-process format (older
        # readers, a resume on another number of processes); under DDP every rank's is added.
        from probseg.distributed import gather_from_ranks

        state = rng_state()
        checkpoint[RNG_KEY] = state
        per_rank = gather_from_ranks(state)  # every rank runs this hook, so all reach the collective
        if per_rank is not None:
            checkpoint[RNG_RANKS_KEY] = per_rank

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        from probseg.distributed import diverge_per_rank, is_fitting, select_rank_state

        rng, own = select_rank_state(checkpoint.get(RNG_RANKS_KEY), checkpoint.get(RNG_KEY), "random generators",
                                     warn=is_fitting(trainer))
        if rng is None:
            return
        set_rng_state(rng)
        if own:
            return  # each rank continues its own streams: exact
        # Rank 0's generators: exact for one process; other ranks then move to their own streams.
        diverge_per_rank(int(rng["torch"][:8].view(torch.int64)[0]) + trainer.global_step)
