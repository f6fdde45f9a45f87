"""Built-in synthetic multi-rater data with a KNOWN distribution of plausible segmentations.

Nothing is read or downloaded: every image is generated from ``(seed, split, index)``.

Each image shows a bright elliptical *core* (semi-axes 12-20% of the image size, random center
and rotation) and, attached to it, a round *lobe* (radius 12-16%) of contrast ``c`` in [0, 1]:
its intensity above background is ``c`` times the core's. The rater model is:

* every rater segments the core;
* a rater includes the lobe with probability ``p = c`` (independently per rater): a lobe of
  contrast 0 (invisible) or 1 (as bright as the core) is unambiguous, one of contrast 0.5 splits
  the raters 50/50;
* boundary disagreement: each rater draws an offset ``d`` in {-1, 0, +1} pixels with
  probabilities ``boundary_probs`` (default 0.25, 0.5, 0.25) that grows or shrinks both core and
  lobe radii.

Contrasts are drawn so that ``unambiguous_fraction`` of the images have ``c`` in {0, 1} and the
rest have ``c`` uniform in ``ambiguous_range``. :meth:`SyntheticDataset.sample_oracle` draws
segmentations from exactly this rater model, so a model can be compared with the best
achievable distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from probseg.data.base import SPLITS, ProbSegDataModule

_SPLIT_CODE = {split: i for i, split in enumerate(SPLITS)}
# Stream ids of the per-image generators. They must be non-zero: numpy's SeedSequence ignores
# trailing zeros, so [seed, split, index, 0] would repeat the stream of [seed, split, index].
_GEOMETRY_STREAM, _NOISE_STREAM, _RATER_STREAM, _ORACLE_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class SyntheticCase:
    """Parameters of one synthetic image (all lengths in pixels)."""

    center: tuple[float, float]  # core center (row, col)
    radii: tuple[float, float]  # core semi-axes before rotation
    angle: float  # core rotation in radians
    lobe_center: tuple[float, float]
    lobe_radius: float
    contrast: float  # c: lobe intensity relative to the core, and P(rater includes lobe)

    @property
    def lobe_probability(self) -> float:
        """Probability that a rater includes the lobe (equal to its contrast)."""
        return self.contrast


class SyntheticDataset(Dataset):
    """Deterministic synthetic multi-rater images; see the module docstring for the rater model.

    Args:
        num_images: images in the split.
        split: "train", "val" or "test" (each split draws different images).
        image_size: H = W.
        num_raters: R, rater slots per image.
        min_raters: when set, each image has between ``min_raters`` and R raters; the missing
            slots hold zeros and ``rater_mask`` is False there.
        seed: base seed; the same seed gives the same images and raters.
        noise_std: std of the additive Gaussian image noise.
        unambiguous_fraction: share of images whose lobe contrast is exactly 0 or 1.
        ambiguous_range: contrast range of the other images.
        boundary_probs: probabilities of the boundary offsets -1, 0, +1 pixel.

    Items are dicts: ``image`` (1, H, W) float32, ``masks`` (R, H, W) int64 in {0, 1},
    ``rater_mask`` (R,) bool, ``id`` str, ``index`` int (position in the split).
    """

    def __init__(
        self,
        num_images: int,
        split: str = "train",
        image_size: int = 64,
        num_raters: int = 4,
        min_raters: int | None = None,
        seed: int = 0,
        noise_std: float = 0.1,
        unambiguous_fraction: float = 0.4,
        ambiguous_range: tuple[float, float] = (0.15, 0.85),
        boundary_probs: tuple[float, float, float] = (0.25, 0.5, 0.25),
    ) -> None:
        if split not in _SPLIT_CODE:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if num_raters < 1:
            raise ValueError(f"num_raters must be positive, got {num_raters}")
        if min_raters is not None and not 1 <= min_raters <= num_raters:
            raise ValueError(f"min_raters must be in [1, num_raters={num_raters}], got {min_raters}")
        if len(boundary_probs) != 3 or abs(sum(boundary_probs) - 1) > 1e-6 or min(boundary_probs) < 0:
            raise ValueError(f"boundary_probs must be 3 probabilities summing to 1, got {boundary_probs}")
        lo, hi = ambiguous_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"ambiguous_range must satisfy 0 <= lo <= hi <= 1, got {ambiguous_range}")
        self.num_images = num_images
        self.split = split
        self.image_size = image_size
        self.num_raters = num_raters
        self.min_raters = min_raters
        self.seed = seed
        self.noise_std = noise_std
        self.unambiguous_fraction = unambiguous_fraction
        self.ambiguous_range = (float(lo), float(hi))
        self.boundary_probs = np.asarray(boundary_probs, dtype=float)
        grid = np.arange(image_size, dtype=np.float64) + 0.5
        self._rows, self._cols = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.num_images

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} is out of range for {self.num_images} {self.split} images")
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index, stream])

    def case(self, index: int) -> SyntheticCase:
        """The parameters (geometry, contrast, lobe probability) of image ``index``."""
        rng = self._rng(index, _GEOMETRY_STREAM)
        n = self.image_size
        center = tuple(rng.uniform(0.35, 0.65, size=2) * n)
        radii = tuple(rng.uniform(0.12, 0.2, size=2) * n)
        angle = float(rng.uniform(0, np.pi))
        lobe_radius = float(rng.uniform(0.12, 0.16) * n)
        phi = rng.uniform(0, 2 * np.pi)
        reach = min(radii) + 0.6 * lobe_radius
        lobe_center = (center[0] + reach * np.sin(phi), center[1] + reach * np.cos(phi))
        if rng.uniform() < self.unambiguous_fraction:
            contrast = float(rng.integers(0, 2))
        else:
            contrast = float(rng.uniform(*self.ambiguous_range))
        return SyntheticCase(center, radii, angle, lobe_center, lobe_radius, contrast)

    def _core(self, case: SyntheticCase, offset: float) -> np.ndarray:
        dr, dc = self._rows - case.center[0], self._cols - case.center[1]
        cos, sin = np.cos(case.angle), np.sin(case.angle)
        u, v = cos * dr + sin * dc, -sin * dr + cos * dc
        a, b = case.radii[0] + offset, case.radii[1] + offset
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0

    def _lobe(self, case: SyntheticCase, offset: float) -> np.ndarray:
        d2 = (self._rows - case.lobe_center[0]) ** 2 + (self._cols - case.lobe_center[1]) ** 2
        return d2 <= (case.lobe_radius + offset) ** 2

    def image(self, index: int) -> np.ndarray:
        """(1, H, W) float32 image of ``index``."""
        case = self.case(index)
        core, lobe = self._core(case, 0.0), self._lobe(case, 0.0)
        intensity = np.where(core, 1.0, np.where(lobe, case.contrast, 0.0))
        noise = self._rng(index, _NOISE_STREAM).normal(0.0, self.noise_std, size=intensity.shape)
        return (0.1 + 0.8 * intensity + noise).astype(np.float32)[None]

    def _draw(self, case: SyntheticCase, n: int, rng: np.random.Generator) -> np.ndarray:
        """n segmentations from the rater model, (n, H, W) int64."""
        offsets = (-1.0, 0.0, 1.0)
        cores = np.stack([self._core(case, o) for o in offsets])
        lobes = np.stack([self._lobe(case, o) for o in offsets])
        which = rng.choice(3, size=n, p=self.boundary_probs)
        include = rng.uniform(size=n) < case.lobe_probability
        return (cores[which] | (lobes[which] & include[:, None, None])).astype(np.int64)

    def raters(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The dataset's rater masks (R, H, W) and rater_mask (R,) of ``index``."""
        rng = self._rng(index, _RATER_STREAM)
        masks = self._draw(self.case(index), self.num_raters, rng)
        present = np.ones(self.num_raters, dtype=bool)
        if self.min_raters is not None:
            count = int(rng.integers(self.min_raters, self.num_raters + 1))
            present[count:] = False
            masks[count:] = 0
        return masks, present

    def sample_oracle(self, index: int, n: int, generator: np.random.Generator | int | None = None) -> torch.Tensor:
        """Draw ``n`` segmentations of image ``index`` from the TRUE rater distribution.

        Args:
            index: image index in this split.
            n: number of segmentations.
            generator: numpy Generator or int seed; None uses a fixed stream per image, so two
                calls give the same draws.

        Returns:
            (n, H, W) int64 masks.
        """
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        case = self.case(index)
        if generator is None:
            generator = self._rng(index, _ORACLE_STREAM)
        elif not isinstance(generator, np.random.Generator):
            generator = np.random.default_rng(generator)
        return torch.from_numpy(self._draw(case, n, generator))

    def lobe_region(self, index: int) -> np.ndarray:
        """(H, W) bool: pixels inside the lobe for every boundary offset and outside the core for
        every offset, so membership there depends only on the lobe decision."""
        case = self.case(index)
        return self._lobe(case, -1.0) & ~self._core(case, 1.0)

    def lobe_included(self, index: int, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Which of ``masks`` (n, H, W) include the lobe of image ``index`` (most of
        :meth:`lobe_region` foreground). Returns (n,) bool."""
        region = torch.from_numpy(self.lobe_region(index))
        masks = torch.as_tensor(masks)
        if masks.ndim != 3 or masks.shape[-2:] != region.shape:
            raise ValueError(f"expected masks of shape (n, {self.image_size}, {self.image_size}), got {tuple(masks.shape)}")
        if not region.any():
            raise ValueError(f"image {index} has no pixel that belongs to the lobe alone")
        return (masks[:, region] > 0).float().mean(1) > 0.5

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.num_images
        masks, present = self.raters(index)
        return {
            "image": torch.from_numpy(self.image(index)),
            "masks": torch.from_numpy(masks),
            "rater_mask": torch.from_numpy(present),
            "id": f"synthetic-{self.split}-{index:05d}",
            "index": index,
        }


CV_FOLDS = 3
"""Folds of the cross-validation (``SyntheticDataModule(fold=k)``), as in the papers' protocol."""


class FoldView(Dataset):
    """The images ``indices`` of a :class:`SyntheticDataset`, renumbered 0..n-1 (``index`` is
    the position in the view, as in every split; ``id`` stays the pool image's), with the
    pool's oracle."""

    def __init__(self, pool: SyntheticDataset, indices: np.ndarray) -> None:
        self.pool, self.indices = pool, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.pool[int(self.indices[index])]
        item["index"] = index if index >= 0 else index + len(self)
        return item

    def sample_oracle(self, index: int, n: int, generator: np.random.Generator | int | None = None) -> torch.Tensor:
        """``n`` draws from the true rater distribution of image ``index`` of the view."""
        return self.pool.sample_oracle(int(self.indices[index]), n, generator)


class SyntheticDataModule(ProbSegDataModule):
    """The embedded default data: :class:`SyntheticDataset` train/val/test splits.

    Args:
        image_size: H = W (default 64).
        num_train, num_val, num_test: images per split.
        num_raters: R (default 4).
        min_raters: when set, images have between ``min_raters`` and R raters.
        seed: data seed (independent of Lightning's training seed).
        noise_std: image noise.
        batch_size, num_workers: loader settings.
        augmentation: training augmentation (see :class:`~probseg.data.base.ProbSegDataModule`).
        fold: None (default: separate train and val images), or 0..2 for 3-fold cross-validation
            as in the papers' protocol: the num_train + num_val training images form one pool cut
            into 3 folds (in order); fold k is the validation set and the other two the training
            set. The test images do not depend on the fold.
    """

    def __init__(
        self,
        image_size: int = 64,
        num_train: int = 1000,
        num_val: int = 100,
        num_test: int = 100,
        num_raters: int = 4,
        min_raters: int | None = None,
        seed: int = 0,
        noise_std: float = 0.1,
        batch_size: int = 16,
        num_workers: int = 0,
        augmentation: bool | dict[str, Any] | None = None,
        fold: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, num_classes=2, in_channels=1,
                         augmentation=augmentation)
        if fold is not None and not 0 <= fold < CV_FOLDS:
            raise ValueError(f"fold must be None or in 0..{CV_FOLDS - 1}, got {fold}")
        if fold is not None and num_train + num_val < CV_FOLDS:
            raise ValueError(f"3-fold cross-validation needs num_train + num_val >= 3, got {num_train + num_val}")
        self.save_hyperparameters()
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}

    def make_dataset(self, split: str) -> SyntheticDataset | FoldView:
        hp = self.hparams
        if hp.fold is not None and split != "test":
            pool = self._dataset_of("train", self.sizes["train"] + self.sizes["val"])
            folds = np.array_split(np.arange(len(pool)), CV_FOLDS)
            keep = folds[hp.fold] if split == "val" else np.concatenate([f for k, f in enumerate(folds) if k != hp.fold])
            return FoldView(pool, keep)
        return self._dataset_of(split, self.sizes[split])

    def _dataset_of(self, split: str, size: int) -> SyntheticDataset:
        hp = self.hparams
        return SyntheticDataset(
            size,
            split=split,
            image_size=hp.image_size,
            num_raters=hp.num_raters,
            min_raters=hp.min_raters,
            seed=hp.seed,
            noise_std=hp.noise_std,
        )

    def sample_oracle(self, index: int, n: int, split: str = "test", generator: Any = None) -> torch.Tensor:
        """``n`` draws (n, H, W) from the true rater distribution of image ``index`` of ``split``."""
        return self.dataset(split).sample_oracle(index, n, generator)
