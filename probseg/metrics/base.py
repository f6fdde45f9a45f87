"""Base class of the zoo's metrics: per-image values, synced across processes, deduplicated.

Lightning's DistributedSampler pads an uneven evaluation set by repeating items, so a naive
mean over ranks counts those images twice. Each update therefore stores, next to the per-image
values, the images' dataset indices (``batch["index"]``); after the cross-process gather, one
value per index is kept, so the result equals the single-process result on the same data.
Without indices every stored value counts (correct in a single process).

Dataset-pooled values (e.g. the Dice of all pixels of the dataset) cannot be averaged from
per-image values, and plain summed states would count DDP's padded repeats twice. A metric that
reports them therefore stores each image's sufficient statistics (``statistic_names``, e.g. its
overlap counts) next to its values, deduplicated by the same indices, and sums them after the
gather (:meth:`PerImageMetric.pooled`); so a subset of the images (the results tables' rows)
can be pooled as well.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from probseg._ops import accumulation_dtype

NO_INDEX = -1
"""Index stored for images whose dataset index is unknown (never deduplicated)."""


class PerImageMetric(Metric):
    """Stores one value per image for each name in ``value_names``; ``compute`` gives the means
    and :meth:`per_image` the values themselves (for standard deviations and tables).

    A subclass that reports dataset-pooled values also stores per-image statistics (one tensor
    per name in ``statistic_names``, (B, ...) per batch) and implements :meth:`pool`; ``compute``
    then adds the pooled values of every stored image next to the means.

    Args:
        value_names: the metric values stored per image.
        statistic_names: per-image statistics that are summed over images for pooled values.
        **kwargs: torchmetrics ``Metric`` options (``dist_sync_fn``, ``process_group``, ...).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, value_names: tuple[str, ...], statistic_names: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        if not value_names:
            raise ValueError("a metric needs at least one value name")
        self.value_names = tuple(value_names)
        self.statistic_names = tuple(statistic_names)
        for name in self.value_names:
            self.add_state(f"values_{name}", default=[], dist_reduce_fx="cat")
        for name in self.statistic_names:
            self.add_state(f"statistics_{name}", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def _store(self, values: dict[str, torch.Tensor], index: torch.Tensor | None,
               statistics: dict[str, torch.Tensor] | None = None) -> None:
        sizes = {name: v.shape for name, v in values.items()}
        if set(values) != set(self.value_names) or len({tuple(s) for s in sizes.values()}) != 1:
            raise ValueError(f"expected one (B,) tensor for each of {self.value_names}, got {sizes}")
        batch = next(iter(values.values())).shape[0]
        statistics = statistics or {}
        if set(statistics) != set(self.statistic_names) or any(s.shape[0] != batch for s in statistics.values()):
            raise ValueError(f"expected one (B, ...) statistics tensor for each of {self.statistic_names} with "
                             f"B = {batch}, got { {name: tuple(s.shape) for name, s in statistics.items()} }")
        if index is None:
            index = torch.full((batch,), NO_INDEX, dtype=torch.long, device=self.device)
        index = torch.as_tensor(index, device=self.device)
        if index.is_floating_point():
            raise TypeError(f"index must hold integer dataset indices, got dtype {index.dtype}")
        index = index.long().flatten()
        if index.shape != (batch,):
            raise ValueError(f"index must hold one dataset index per image ({batch}), got {tuple(index.shape)}")
        wide = accumulation_dtype(self.device)
        for name, value in values.items():
            getattr(self, f"values_{name}").append(value.detach().to(self.device, wide))
        for name, value in statistics.items():
            getattr(self, f"statistics_{name}").append(value.detach().to(self.device, wide))
        self.index.append(index)

    def _gathered(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Values and statistics (one dict, statistics under their own names) and indices, one
        entry per distinct index."""
        # Lists of batch tensors before a sync, one gathered tensor after it.
        names = [f"values_{name}" for name in self.value_names] + [f"statistics_{n}" for n in self.statistic_names]
        empty = self.index.numel() == 0 if isinstance(self.index, torch.Tensor) else not self.index
        if empty:
            empty = torch.zeros(0, dtype=accumulation_dtype(self.device), device=self.device)
            return {name: empty for name in names}, torch.zeros(0, dtype=torch.long, device=self.device)
        index = dim_zero_cat(self.index)
        values = {name: dim_zero_cat(getattr(self, name)) for name in names}
        if bool((index == NO_INDEX).any()):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                warnings.warn(
                    f"{type(self).__name__}: images without a dataset index are counted as they come; "
                    "under DDP the sampler's padded repeats count twice. Put 'index' in the batches.",
                    stacklevel=2,
                )
            return values, index
        unique, inverse = torch.unique(index, return_inverse=True)
        position = torch.arange(index.numel(), device=index.device)
        first = torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, position, reduce="amin")
        return {name: v[first] for name, v in values.items()}, unique

    def per_image_with_statistics(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """As :meth:`per_image`, with the per-image statistics (N, ...) aligned with the values
        (what :meth:`pool` takes, e.g. to pool a subset of the images)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True):
            stored, index = self._gathered()
        return self._split(stored) + (index,)

    def per_image(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-image values and their dataset indices, gathered from every process: one value
        per distinct index, sorted by index; images stored without an index (index -1) are all
        kept, in the order they came."""
        values, _, index = self.per_image_with_statistics()
        return values, index

    def _split(self, stored: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        values = {name: stored[f"values_{name}"] for name in self.value_names}
        return values, {name: stored[f"statistics_{name}"] for name in self.statistic_names}

    def pool(self, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dataset-pooled values from per-image statistics (N, ...) of N distinct images (all
        of them, or a subset): ``{name: 0-dim tensor}``, empty by default; a subclass with
        ``statistic_names`` implements it."""
        return {}

    def compute(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """Mean over images of each value (a tensor for a single value, else a dict); images whose
        value is NaN (undefined, e.g. a Hausdorff distance to an empty mask under
        ``hausdorff_empty="nan"``) are left out; NaN when no image has a value. A metric with
        statistics adds its pooled values (:meth:`pool`) to the dict."""
        values, statistics = self._split(self._gathered()[0])
        means = {
            name: v.nanmean() if v.numel() else torch.tensor(float("nan"), dtype=accumulation_dtype(self.device), device=self.device)
            for name, v in values.items()
        }
        if self.statistic_names:
            return {**means, **self.pool(statistics)}
        return means[self.value_names[0]] if len(means) == 1 else means
