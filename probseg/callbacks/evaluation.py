"""Evaluation at validation and test end: hypotheses drawn, metrics updated, values logged.

The maths lives in :mod:`probseg.metrics`; this callback draws the hypotheses, feeds them to a
:class:`~probseg.metrics.HypothesisMetrics` and logs the results as ``"{stage}/{name}"``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from probseg.metrics import HypothesisMetrics, MeanPredictionMetrics, RaterCoverage
from probseg.metrics.base import NO_INDEX, PerImageMetric
from probseg.metrics.functional import CE_READINGS, GINI_OF, KERNELS, MATCHINGS, check_hausdorff_empty, check_kernels
from probseg.results import SUBSETS, Pooling, conventions_label, subset_rows, summarize, write_results


def per_image_generators(index: torch.Tensor, seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, dataset index): an image's hypotheses are the
    same whatever batch or process it lands in."""
    return [torch.Generator(device=device).manual_seed((seed << 32) + int(i)) for i in index.tolist()]


def draw_generators(batch: dict[str, Any], seed: int, batch_idx: int, device: torch.device) -> Any:
    """Per-image generators when the batch carries ``index``, else one seeded by the batch."""
    index = batch.get("index")
    if index is not None:
        return per_image_generators(torch.as_tensor(index), seed, device)
    return torch.Generator(device=device).manual_seed((seed << 32) + batch_idx)


def batch_index(batch: dict[str, Any]) -> torch.Tensor | None:
    """The batch's dataset indices as a tensor, or None."""
    index = batch.get("index")
    return None if index is None else torch.as_tensor(index)


def evaluated_split(trainer: pl.Trainer, stage: str) -> Any:
    """The datamodule's dataset of ``stage`` when the loader being evaluated reads exactly it, else
    None (e.g. ``trainer.test(model, dataloaders=...)`` after a fit on a datamodule: Lightning
    keeps the old datamodule attached, whose oracle would describe other images)."""
    datamodule = trainer.datamodule
    datasets = getattr(datamodule, "datasets", None)
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    if not isinstance(datasets, dict) or stage not in datasets or loaders is None:
        return None
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return datasets[stage] if len(loaders) == 1 and getattr(loaders[0], "dataset", None) is datasets[stage] else None


def subset_pooling(metric: PerImageMetric, statistics: dict[str, torch.Tensor]) -> Pooling:
    """The pooled values of any subset of a metric's images, from its gathered per-image
    statistics (aligned with its per-image values): for the results tables' rows."""

    def pooled(keep: torch.Tensor) -> dict[str, float]:
        kept = {name: s[keep.to(s.device)] for name, s in statistics.items()}
        return {name: float(value) for name, value in metric.pool(kept).items()}

    return pooled


def dataset_name(datamodule: Any) -> str:
    """A short dataset label for tables: ``SyntheticDataModule`` -> ``synthetic``."""
    if datamodule is None:
        return ""
    name = getattr(datamodule, "dataset_name", None) or type(datamodule).__name__
    return str(name).removesuffix("DataModule").lower()


class EvaluationCallback(Callback):
    """Log the evaluation metrics of ``N_eval`` hypotheses per image at validation and test end.

    Logged keys (``stage`` = val or test): ``hm_iou``, ``hm_dice``, ``hm_hausdorff``, ``hm_ce``
    (Hungarian-matched empirical Wasserstein metric per kernel), ``ged``, ``diversity``, ``ece``,
    ``dice``, ``bdice`` (means over images), ``ece_pooled`` and ``dice_pooled`` (pooled over
    every pixel of the evaluated images; see :mod:`probseg.metrics.hypotheses`) and ``gini`` (prior
    singular values; models with a latent prior). The results tables carry the pooled values next
    to the per-image ones, pooled over each row's images. When the data
    module can sample its true rater distribution (``sample_oracle``, e.g. the synthetic data),
    the same metrics of ``N_eval`` oracle draws are logged as ``"{stage}/oracle_{name}"``: a
    reference, the floor for the IoU, Dice and Hausdorff kernels and GED (the oracle's
    hypotheses are hard 0/1 masks, so its cross-entropy and calibration are those of certain
    predictions, which a soft predictor can beat). At test end a results table (CSV, Markdown)
    and per-image values are written to ``results_dir``.

    For a student trained by distillation (a model with a ``teacher``), the test also evaluates
    the teacher: its hypotheses as ``test/teacher_{name}`` (row "teacher"), and its predictive
    probabilities (the mean of ``num_samples`` hypotheses) after the student's KDE calibration
    (and label smoothing, if set) as ``test/teacher_kde_{ece,dice,bdice}`` (row "teacher_kde",
    only with a KDE). The KDE's key points come from each test batch with the raters' mean as
    labels, as in training, so that row approximates the targets the student was given, fitted
    in-sample; it is not a held-out calibration result, and unlike the other rows it depends on
    the batching (the KDE is a per-batch estimate).

    Hypotheses of image i are drawn from a generator seeded by (seed, i), i = ``batch["index"]``,
    and each index counts once: the numbers do not depend on batching, on the number of
    processes, or on DDP's padding of uneven splits.

    Args:
        num_samples: N_eval hypotheses per image (the cSAE paper: 16).
        kernels: kernels of the Hungarian-matched metric.
        oracle: also evaluate the data's oracle sampler when it has one.
        every_n_epochs: during fit, evaluate the validations of every n-th training epoch
            (``(epoch + 1) % n == 0``); validate and test always evaluate.
        seed: seed of the hypotheses.
        num_bins: ECE bins.
        self_pairs: GED and diversity include i = j pairs (published convention).
        matching: how hypotheses meet raters when R does not divide S, one of
            :data:`probseg.metrics.functional.MATCHINGS` ("lcm": exact optimal transport;
            "tile": the cSAE paper's; "rectangular": optimistic).
        gini_of: the Gini index of the prior's "sigma" (default) or "variance".
        ce_reading: the "ce" kernel's reading: "mean" (default), "sum" or "binarized" (see
            :data:`probseg.metrics.functional.CE_READINGS`).
        hausdorff_empty: the Hausdorff distance between a mask and an empty one: "diagonal"
            (default), "max_distance" or "nan" (see
            :data:`probseg.metrics.functional.HAUSDORFF_EMPTY`).
        results_dir: folder of the test results (default ``{default_root_dir}/results``).
        teacher: evaluate a distillation student's teacher at test (when its checkpoint is
            found; a missing one is reported with a warning and its rows are left out).
    """

    SOURCES = {"model": "", "oracle": "oracle_", "teacher": "teacher_", "teacher_kde": "teacher_kde_"}
    """Result rows and the prefixes of their logged keys."""

    def __init__(
        self,
        num_samples: int = 16,
        kernels: Sequence[str] = KERNELS,
        oracle: bool = True,
        every_n_epochs: int = 1,
        seed: int = 0,
        num_bins: int = 15,
        self_pairs: bool = True,
        results_dir: str | None = None,
        teacher: bool = True,
        matching: str = "lcm",
        gini_of: str = "sigma",
        ce_reading: str = "mean",
        hausdorff_empty: str = "diagonal",
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        check_kernels(kernels)
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        if gini_of not in GINI_OF:
            raise ValueError(f"gini_of must be one of {GINI_OF}, got {gini_of!r}")
        if ce_reading not in CE_READINGS:
            raise ValueError(f"ce_reading must be one of {CE_READINGS}, got {ce_reading!r}")
        self.matching, self.gini_of, self.ce_reading = matching, gini_of, ce_reading
        self.hausdorff_empty = check_hausdorff_empty(hausdorff_empty)
        self.num_samples = num_samples
        self.kernels = tuple(kernels)
        self.oracle = oracle
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.num_bins = num_bins
        self.self_pairs = self_pairs
        self.results_dir = results_dir
        self.teacher = teacher
        self._teacher_stage: dict[str, Any] = {}
        self._metrics: dict[str, HypothesisMetrics] = {}
        self._coverage: dict[str, RaterCoverage] = {}  # per stage: which raters mark a structure
        self._oracle_split: dict[str, Any] = {}
        self.last_results: list[dict] = []  # rows of the last test's results table

    def conventions(self) -> str:
        """The evaluation conventions of the results, as written in their ``conventions`` column."""
        return conventions_label(self.self_pairs, self.matching, self.ce_reading, self.gini_of, self.hausdorff_empty)

    # --- hooks -------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, "test")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(trainer):
            self._update(trainer, pl_module, batch, batch_idx, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, pl_module, batch, batch_idx, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_image = {}
        for source in self.SOURCES:
            metric = self._metrics.get(f"test/{source}")
            if metric is not None:
                values, statistics, index = metric.per_image_with_statistics()
                per_image[source] = (values, index, subset_pooling(metric, statistics))
        coverage = self._coverage.pop("test", None)
        coverage = coverage.per_image() if coverage is not None else None
        self._log(pl_module, "test")
        if per_image and trainer.is_global_zero:
            self._write(trainer, pl_module, per_image, coverage)

    # --- work --------------------------------------------------------------------------------

    def _start(self, trainer: pl.Trainer, stage: str) -> None:
        # Drop what an interrupted evaluation left behind; decide once whether the oracle applies.
        for source in self.SOURCES:
            self._metrics.pop(f"{stage}/{source}", None)
        self._coverage.pop(stage, None)
        self._oracle_split[stage] = evaluated_split(trainer, stage) if self.oracle else None
        self._teacher_stage[stage] = self._find_teacher(trainer.lightning_module) if stage == "test" else None

    def _find_teacher(self, pl_module: pl.LightningModule) -> Any:
        """The student's distillation when its teacher can be evaluated, else None."""
        distiller = getattr(pl_module, "distiller", None)
        if not self.teacher or distiller is None:
            return None
        found = True
        try:
            distiller.teacher_model(pl_module.device)
        except FileNotFoundError as err:
            warnings.warn(f"the teacher is not evaluated: {err}", stacklevel=2)
            found = False
        trainer = pl_module.trainer
        if trainer.world_size > 1:  # every process evaluates the teacher, or none (its metrics gather)
            found = trainer.strategy.reduce_boolean_decision(found, all=True)
        return distiller if found else None

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _metric(self, key: str, pl_module: pl.LightningModule, gini: bool) -> HypothesisMetrics:
        if key not in self._metrics:
            self._metrics[key] = HypothesisMetrics(
                num_classes=pl_module.num_classes, kernels=self.kernels, gini=gini,
                num_bins=self.num_bins, self_pairs=self.self_pairs, matching=self.matching,
                gini_of=self.gini_of, ce_reading=self.ce_reading, hausdorff_empty=self.hausdorff_empty,
            ).to(pl_module.device)
        return self._metrics[key]

    def _update_teacher(self, distiller: Any, pl_module: pl.LightningModule, batch: dict[str, Any],
                        batch_idx: int, stage: str) -> None:
        images = batch["image"]
        teacher = distiller.teacher_model(images.device)
        mean = self._update_hypotheses(f"{stage}/teacher", teacher, pl_module, batch, batch_idx)
        if distiller.kde is None:
            return
        key = f"{stage}/teacher_kde"
        if key not in self._metrics:
            self._metrics[key] = MeanPredictionMetrics(num_bins=self.num_bins).to(pl_module.device)
        generator = torch.Generator(device=images.device).manual_seed((self.seed << 32) + batch_idx)
        calibrated = distiller.calibrate(mean, batch, generator)
        self._metrics[key].update(calibrated, batch["masks"], batch.get("rater_mask"), batch_index(batch))

    def _update_hypotheses(self, key: str, model: pl.LightningModule, pl_module: pl.LightningModule,
                           batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Draw ``num_samples`` hypotheses of ``model`` (the evaluated model or its teacher), add
        them to the metrics under ``key`` and return their (B, K, H, W) mean probabilities (the
        weighted mean for a mixture's weighted hypotheses)."""
        images = batch["image"]
        inputs = images.to(next(model.parameters()).dtype)
        generators = draw_generators(batch, self.seed, batch_idx, images.device)
        weight = None
        if model.weighted:  # a mixture's hypotheses carry weights; the others weigh 1 / S
            logits, weight = model.sample_weighted(inputs, self.num_samples, generator=generators)
        else:
            logits = model.sample(inputs, self.num_samples, generator=generators)
        probs = logits.float().softmax(dim=2)
        sigma = model.prior_sigmas(inputs)
        self._metric(key, pl_module, gini=sigma is not None).update(
            probs, batch["masks"], batch.get("rater_mask"), batch_index(batch), None if sigma is None else sigma.float(),
            sample_weight=weight)
        if weight is None:
            return probs.mean(dim=1)
        return (probs * weight.to(probs.dtype)[:, :, None, None, None]).sum(dim=1)

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        images, masks = batch["image"], batch["masks"]
        rater_mask, index = batch.get("rater_mask"), batch_index(batch)
        self._update_hypotheses(f"{stage}/model", pl_module, pl_module, batch, batch_idx)
        if stage == "test":
            if stage not in self._coverage:
                self._coverage[stage] = RaterCoverage().to(pl_module.device)
            self._coverage[stage].update(masks, rater_mask, index)
        dataset = self._oracle_split.get(stage)
        oracle = getattr(dataset, "sample_oracle", None)
        if oracle is not None and index is not None:
            draws = torch.stack([oracle(int(i), self.num_samples) for i in index.tolist()])
            probs = torch.nn.functional.one_hot(draws.to(images.device), pl_module.num_classes)
            self._metric(f"{stage}/oracle", pl_module, gini=False).update(
                probs.permute(0, 1, 4, 2, 3).float(), masks, rater_mask, index
            )
        distiller = self._teacher_stage.get(stage)
        if distiller is not None:
            self._update_teacher(distiller, pl_module, batch, batch_idx, stage)

    def _log(self, pl_module: pl.LightningModule, stage: str) -> None:
        for source, prefix in self.SOURCES.items():
            metric = self._metrics.pop(f"{stage}/{source}", None)
            if metric is None:
                continue
            values = {f"{stage}/{prefix}{name}": value.float() for name, value in metric.compute().items()}
            # Values are already gathered across processes; sync_dist averages identical copies.
            pl_module.log_dict(values, sync_dist=True)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, per_image: dict[str, Any],
               coverage: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        model = getattr(pl_module, "registry_name", "") or type(pl_module).__name__
        if getattr(pl_module, "distiller", None) is not None:
            model += "+kd"  # a distilled student is its own row next to the same model without a teacher
        own_data = evaluated_split(trainer, "test") is not None
        common = {"model": model, "dataset": dataset_name(trainer.datamodule) if own_data else "",
                  "num_samples": self.num_samples, "conventions": self.conventions()}
        rows, table = [], {}
        marking = {}
        if coverage is not None:
            fractions, coverage_index = coverage
            marking = dict(zip(coverage_index.tolist(), fractions["raters_marking"].tolist()))
        for source, (values, index, pooled) in per_image.items():
            known = bool(marking) and all(i in marking for i in index.tolist()) and not bool((index == NO_INDEX).any())
            if known:  # one row per subset of images (all; some rater marks; every rater marks)
                fractions = torch.tensor([marking[i] for i in index.tolist()], dtype=torch.float64)
                rows += subset_rows({**common, "source": source}, values, fractions, pooled)
            else:
                rows.append({**common, "source": source, "subset": "all", "num_images": int(index.numel()),
                             **summarize(values), **pooled(torch.ones(index.numel(), dtype=torch.bool))})
            prefix = self.SOURCES[source]
            for i, idx in enumerate(index.tolist()):
                key = idx if idx != NO_INDEX else f"position {i}"  # batches without "index"
                entry = table.setdefault(key, {"index": idx if idx != NO_INDEX else i})
                entry.update({f"{prefix}{name}": float(v[i]) for name, v in values.items()})
        subsets = list(SUBSETS)
        rows.sort(key=lambda row: subsets.index(row["subset"]))  # every source on all images first
        folder = Path(self.results_dir or os.path.join(trainer.default_root_dir, "results"))
        paths = write_results(folder, rows, list(table.values()))
        self.last_results = rows
        print("\nprobseg test results:\n" + paths[1].read_text() + "".join(f"  written: {p}\n" for p in paths))
