"""Synthetic multi-rater data: determinism, item format, and the rater model (frequency tests).

The geometry (rotated elliptical core, round lobe, pixel centers at i + 0.5) is recomputed here from
``case(i)`` so that the oracle and the raters are checked against the documented model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probseg.data import SyntheticCase, SyntheticDataModule, SyntheticDataset

SIZE = 32
OFFSETS = (-1.0, 0.0, 1.0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centers = np.arange(size) + 0.5
    return np.meshgrid(centers, centers, indexing="ij")


def core_mask(case: SyntheticCase, size: int, offset: float) -> np.ndarray:
    rows, cols = _grid(size)
    dr, dc = rows - case.center[0], cols - case.center[1]
    u = math.cos(case.angle) * dr + math.sin(case.angle) * dc  # rotate into the ellipse frame
    v = -math.sin(case.angle) * dr + math.cos(case.angle) * dc
    return (u / (case.radii[0] + offset)) ** 2 + (v / (case.radii[1] + offset)) ** 2 <= 1.0


def lobe_mask(case: SyntheticCase, size: int, offset: float) -> np.ndarray:
    rows, cols = _grid(size)
    return np.hypot(rows - case.lobe_center[0], cols - case.lobe_center[1]) ** 2 <= (case.lobe_radius + offset) ** 2


def lobe_only_pixels(case: SyntheticCase, size: int) -> np.ndarray:
    """Pixels inside the smallest lobe and outside the largest core: 1 iff the lobe is included."""
    region = lobe_mask(case, size, -1.0) & ~core_mask(case, size, 1.0)
    assert region.any(), "test geometry: the lobe has no pixel outside the core"
    return region


def core_only_counts(case: SyntheticCase, size: int) -> tuple[np.ndarray, list[int]]:
    """Region outside the largest lobe, and the core's pixel count there for each offset."""
    region = ~lobe_mask(case, size, 1.0)
    counts = [int((core_mask(case, size, o) & region).sum()) for o in OFFSETS]
    assert len(set(counts)) == 3, "test geometry: offsets not distinguishable"
    return region, counts


def model_masks(case: SyntheticCase, size: int) -> np.ndarray:
    """All segmentations the rater model can produce: (6, H, W) for 3 offsets x lobe in/out."""
    out = []
    for o in OFFSETS:
        core, lobe = core_mask(case, size, o), lobe_mask(case, size, o)
        out += [core, core | lobe]
    return np.stack(out).astype(np.int64)


def _indices(ds: SyntheticDataset, predicate, count: int) -> list[int]:
    found = [i for i in range(len(ds)) if predicate(ds.case(i).contrast)][:count]
    assert len(found) == count, "test setup: not enough images of the wanted kind"
    return found


@pytest.fixture(scope="module")
def ds() -> SyntheticDataset:
    return SyntheticDataset(40, split="test", image_size=SIZE, seed=0)


# --- determinism and format ---------------------------------------------------------------------


def test_same_seed_gives_identical_items_and_different_seed_differs() -> None:
    a = SyntheticDataset(4, image_size=SIZE, seed=3)
    b = SyntheticDataset(4, image_size=SIZE, seed=3)
    c = SyntheticDataset(4, image_size=SIZE, seed=4)
    for i in range(4):
        x, y, z = a[i], b[i], c[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"])
        assert torch.equal(x["rater_mask"], y["rater_mask"]) and x["id"] == y["id"]
        assert not torch.equal(x["image"], z["image"])
        assert not torch.equal(x["masks"], z["masks"])
        assert a.case(i) == b.case(i) != c.case(i)


def test_item_format() -> None:
    ds = SyntheticDataset(3, split="val", image_size=SIZE, num_raters=5, seed=1)
    item = ds[2]
    assert set(item) == {"image", "masks", "rater_mask", "id", "index"}
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["masks"].shape == (5, SIZE, SIZE) and item["masks"].dtype == torch.int64
    assert set(item["masks"].unique().tolist()) <= {0, 1}
    assert item["masks"].sum() > 0
    assert item["rater_mask"].shape == (5,) and item["rater_mask"].dtype == torch.bool
    assert item["rater_mask"].all()
    assert isinstance(item["id"], str) and "val" in item["id"]
    assert len({ds[i]["id"] for i in range(3)}) == 3
    assert item["index"] == 2
    assert len(ds) == 3


def test_negative_and_out_of_range_indices() -> None:
    ds = SyntheticDataset(3, image_size=SIZE)
    assert torch.equal(ds[-1]["image"], ds[2]["image"])
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.case(5)


def test_splits_draw_different_images() -> None:
    items = {s: SyntheticDataset(3, split=s, image_size=SIZE, seed=0)[0] for s in ("train", "val", "test")}
    assert not torch.equal(items["train"]["image"], items["val"]["image"])
    assert not torch.equal(items["val"]["image"], items["test"]["image"])
    assert not torch.equal(items["train"]["image"], items["test"]["image"])
    assert len({it["id"] for it in items.values()}) == 3


@pytest.mark.parametrize("size", [16, 40, 64])
def test_image_size_is_configurable(size: int) -> None:
    item = SyntheticDataset(2, image_size=size, num_raters=2)[1]
    assert item["image"].shape == (1, size, size)
    assert item["masks"].shape == (2, size, size)


@pytest.mark.parametrize(("min_raters", "num_raters"), [(1, 4), (2, 4), (3, 3)])
def test_min_raters_gives_between_min_and_r_raters_with_zeros_in_missing_slots(min_raters: int, num_raters: int) -> None:
    ds = SyntheticDataset(40, image_size=16, num_raters=num_raters, min_raters=min_raters, seed=0)
    counts = set()
    for i in range(len(ds)):
        item = ds[i]
        present = item["rater_mask"]
        n = int(present.sum())
        counts.add(n)
        assert min_raters <= n <= num_raters
        assert present[:n].all() and not present[n:].any()  # present raters come first
        assert (item["masks"][~present] == 0).all()
        assert (item["masks"][present].flatten(1).sum(1) > 0).all()  # every present rater drew the core
    if min_raters < num_raters:
        assert counts == set(range(min_raters, num_raters + 1)), counts
    else:
        assert counts == {num_raters}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "training"}, "split"),
        ({"num_images": 0}, "num_images"),
        ({"image_size": 8}, "image_size"),
        ({"num_raters": 0}, "num_raters"),
        ({"min_raters": 0}, "min_raters"),
        ({"min_raters": 5}, "min_raters"),
        ({"boundary_probs": (0.5, 0.5)}, "boundary_probs"),
        ({"boundary_probs": (0.5, 0.5, 0.5)}, "boundary_probs"),
        ({"boundary_probs": (1.2, -0.1, -0.1)}, "boundary_probs"),
        ({"ambiguous_range": (0.8, 0.2)}, "ambiguous_range"),
        ({"ambiguous_range": (-0.1, 0.5)}, "ambiguous_range"),
        ({"ambiguous_range": (0.5, 1.5)}, "ambiguous_range"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"num_images": 2, "num_raters": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SyntheticDataset(**args)


# --- the image follows the case ---------------------------------------------------------------


def test_noise_free_image_is_core_plus_contrast_weighted_lobe(ds: SyntheticDataset) -> None:
    clean = SyntheticDataset(40, split="test", image_size=SIZE, seed=0, noise_std=0.0)
    for i in _indices(clean, lambda c: 0 < c < 1, 3) + _indices(clean, lambda c: c == 1, 1):
        case = clean.case(i)
        assert case == ds.case(i)  # the noise level does not change the geometry
        core, lobe = core_mask(case, SIZE, 0.0), lobe_mask(case, SIZE, 0.0)
        intensity = np.where(core, 1.0, np.where(lobe, case.contrast, 0.0))
        np.testing.assert_allclose(clean[i]["image"][0].numpy(), 0.1 + 0.8 * intensity, atol=1e-6)


def test_noise_has_the_requested_std() -> None:
    noisy = SyntheticDataset(40, split="test", image_size=64, seed=0, noise_std=0.3)
    clean = SyntheticDataset(40, split="test", image_size=64, seed=0, noise_std=0.0)
    residual = torch.cat([(noisy[i]["image"] - clean[i]["image"]).flatten() for i in range(4)]).double()
    n = residual.numel()
    assert abs(residual.mean()) < 5 * 0.3 / math.sqrt(n)
    assert abs(residual.std() - 0.3) < 5 * 0.3 / math.sqrt(2 * n)


# --- the oracle follows the rater model -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["ambiguous", "zero", "one"])
def test_oracle_lobe_frequency_matches_lobe_probability(ds: SyntheticDataset, kind: str) -> None:
    predicate = {"ambiguous": lambda c: 0 < c < 1, "zero": lambda c: c == 0, "one": lambda c: c == 1}[kind]
    n = 2000
    for i in _indices(ds, predicate, 4 if kind == "ambiguous" else 2):
        case = ds.case(i)
        assert case.lobe_probability == case.contrast
        samples = ds.sample_oracle(i, n, generator=100 + i).numpy()
        region = lobe_only_pixels(case, SIZE)
        in_region = samples[:, region]
        # the lobe is all-or-nothing over the whole lobe-only region
        assert (in_region.min(1) == in_region.max(1)).all()
        frac = in_region[:, 0].mean()
        p = case.lobe_probability
        tol = 4 * math.sqrt(p * (1 - p) / n)
        assert abs(frac - p) <= tol, (i, frac, p)


@pytest.mark.parametrize("boundary_probs", [(0.25, 0.5, 0.25), (0.1, 0.3, 0.6), (0.7, 0.0, 0.3)])
def test_oracle_boundary_offsets_follow_boundary_probs(boundary_probs: tuple[float, float, float]) -> None:
    ds = SyntheticDataset(8, split="val", image_size=SIZE, seed=2, boundary_probs=boundary_probs)
    n = 2000
    for i in range(3):
        case = ds.case(i)
        region, counts = core_only_counts(case, SIZE)
        totals = ds.sample_oracle(i, n, generator=i).numpy()[:, region].sum(1)
        assert set(np.unique(totals)) <= set(counts), "a core matches none of the three offsets"
        for o_index, p in enumerate(boundary_probs):
            frac = float((totals == counts[o_index]).mean())
            tol = 4 * math.sqrt(p * (1 - p) / n)
            assert abs(frac - p) <= tol, (i, OFFSETS[o_index], frac, p)
        # equivalently, the mean core size
        expected_mean = sum(p * c for p, c in zip(boundary_probs, counts))
        sd = math.sqrt(sum(p * (c - expected_mean) ** 2 for p, c in zip(boundary_probs, counts)))
        assert abs(totals.mean() - expected_mean) <= 4 * sd / math.sqrt(n) + 1e-9


def test_oracle_lobe_and_boundary_are_independent(ds: SyntheticDataset) -> None:
    """The same offset grows or shrinks core and lobe together; lobe inclusion is independent of it."""
    n = 2000
    i = _indices(ds, lambda c: 0.3 < c < 0.7, 1)[0]
    case = ds.case(i)
    samples = ds.sample_oracle(i, n, generator=0).numpy()
    flat = samples.reshape(n, -1)
    masks = model_masks(case, SIZE).reshape(6, -1)
    match = (flat[:, None, :] == masks[None]).all(-1)  # (n, 6)
    assert (match.sum(1) >= 1).all(), "an oracle sample is not one of the model's segmentations"
    which = match.argmax(1)
    offset, lobe = which // 2, which % 2
    p, q = case.lobe_probability, ds.boundary_probs
    for o in range(3):
        for l_in, pl in ((0, 1 - p), (1, p)):
            joint = q[o] * pl
            frac = float(((offset == o) & (lobe == l_in)).mean())
            assert abs(frac - joint) <= 4 * math.sqrt(joint * (1 - joint) / n), (o, l_in, frac, joint)


def test_oracle_format_and_reproducibility(ds: SyntheticDataset) -> None:
    i = _indices(ds, lambda c: 0.2 < c < 0.8, 1)[0]
    a = ds.sample_oracle(i, 50, generator=7)
    assert a.shape == (50, SIZE, SIZE) and a.dtype == torch.int64
    assert set(a.unique().tolist()) <= {0, 1}
    assert torch.equal(a, ds.sample_oracle(i, 50, generator=7))
    assert torch.equal(
        ds.sample_oracle(i, 50, generator=np.random.default_rng(9)),
        ds.sample_oracle(i, 50, generator=np.random.default_rng(9)),
    )
    assert torch.equal(ds.sample_oracle(i, 50), ds.sample_oracle(i, 50))  # None: a fixed stream
    assert not torch.equal(a, ds.sample_oracle(i, 50, generator=8))
    with pytest.raises(ValueError, match="n must be positive"):
        ds.sample_oracle(i, 0)


def test_dataset_raters_follow_the_rater_model(ds: SyntheticDataset) -> None:
    for i in range(12):
        case = ds.case(i)
        masks = ds[i]["masks"].numpy().reshape(ds.num_raters, -1)
        allowed = model_masks(case, SIZE).reshape(6, -1)
        if case.contrast == 0:
            allowed = allowed[0::2]
        elif case.contrast == 1:
            allowed = allowed[1::2]
        assert (masks[:, None, :] == allowed[None]).all(-1).any(1).all(), f"image {i}"


def test_unambiguous_images_have_raters_that_agree_on_the_lobe(ds: SyntheticDataset) -> None:
    for c in (0.0, 1.0):
        for i in _indices(ds, lambda x, c=c: x == c, 3):
            region = lobe_only_pixels(ds.case(i), SIZE)
            lobe_values = ds[i]["masks"].numpy()[:, region]
            assert (lobe_values == int(c)).all(), f"image {i} with contrast {c}"


def test_ambiguous_images_split_the_raters_somewhere() -> None:
    ds = SyntheticDataset(40, image_size=SIZE, num_raters=8, seed=0, unambiguous_fraction=0.0,
                          ambiguous_range=(0.4, 0.6))
    disagree = 0
    for i in range(20):
        lobe_values = ds[i]["masks"].numpy()[:, lobe_only_pixels(ds.case(i), SIZE)][:, 0]
        disagree += int(0 < lobe_values.sum() < len(lobe_values))
    # P(8 raters agree | p in [0.4, 0.6]) <= 2 * 0.6**8 < 0.04, so nearly all 20 images disagree
    assert disagree >= 15


def test_unambiguous_fraction_and_ambiguous_range_shape_the_contrasts() -> None:
    ds = SyntheticDataset(200, image_size=16, unambiguous_fraction=0.3, ambiguous_range=(0.2, 0.4))
    contrasts = np.array([ds.case(i).contrast for i in range(200)])
    unamb = np.isin(contrasts, (0.0, 1.0))
    assert abs(unamb.mean() - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / 200)
    assert ((contrasts[~unamb] >= 0.2) & (contrasts[~unamb] <= 0.4)).all()
    assert (contrasts[unamb] == 0).any() and (contrasts[unamb] == 1).any()


def test_per_image_random_streams_are_distinct() -> None:
    """Geometry, noise, raters and oracle draw from four different streams (numpy's SeedSequence
    ignores trailing zeros, so a zero stream id would silently repeat another stream)."""
    from probseg.data import synthetic

    streams = [synthetic._GEOMETRY_STREAM, synthetic._NOISE_STREAM, synthetic._RATER_STREAM, synthetic._ORACLE_STREAM]
    ds = SyntheticDataset(4, image_size=SIZE, seed=0)
    for i in range(4):
        draws = [tuple(ds._rng(i, stream).random(8)) for stream in streams]
        assert len(set(draws)) == len(streams)


# --- data module --------------------------------------------------------------------------------


@pytest.fixture
def dm() -> SyntheticDataModule:
    return SyntheticDataModule(image_size=SIZE, num_train=4, num_val=3, num_test=2, num_raters=3, seed=5, batch_size=2)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_data_module_sample_oracle_delegates_to_the_split(dm: SyntheticDataModule, split: str) -> None:
    sizes = {"train": 4, "val": 3, "test": 2}
    reference = SyntheticDataset(sizes[split], split=split, image_size=SIZE, num_raters=3, seed=5)
    got = dm.sample_oracle(1, 20, split=split, generator=3)
    assert torch.equal(got, reference.sample_oracle(1, 20, generator=3))
    others = [s for s in sizes if s != split]
    assert not torch.equal(got, dm.sample_oracle(1, 20, split=others[0], generator=3))


def test_data_module_sample_oracle_defaults_to_test_split(dm: SyntheticDataModule) -> None:
    assert torch.equal(dm.sample_oracle(0, 10, generator=1), dm.sample_oracle(0, 10, split="test", generator=1))
    with pytest.raises(IndexError):
        dm.sample_oracle(2, 10)  # the test split has 2 images
    with pytest.raises(ValueError, match="split"):
        dm.sample_oracle(0, 10, split="holdout")


def test_data_module_loaders_batch_in_the_library_format(dm: SyntheticDataModule) -> None:
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["masks"].shape == (2, 3, SIZE, SIZE) and batch["masks"].dtype == torch.int64
    assert batch["rater_mask"].shape == (2, 3) and batch["rater_mask"].dtype == torch.bool
    assert isinstance(batch["id"], list) and len(batch["id"]) == 2
    assert len(dm.dataset("val")) == 3
    val = [b["id"] for b in dm.val_dataloader()]
    assert sum(len(x) for x in val) == 3


def test_folds_cross_validate_one_training_pool_and_keep_the_test_images() -> None:
    """fold k: the num_train + num_val pool in 3 ordered folds, k validates, the other two train;
    every pool image validates exactly once over the folds; test images never change; items are
    renumbered within their split and keep the pool's oracle."""
    pool_ids = [f"synthetic-train-{i:05d}" for i in range(14)]
    pool = SyntheticDataset(14, "train", image_size=16)
    plain = SyntheticDataModule(image_size=16, num_train=10, num_val=4, num_test=3)
    validated = []
    for fold in range(3):
        dm = SyntheticDataModule(image_size=16, num_train=10, num_val=4, num_test=3, fold=fold)
        train, val = dm.dataset("train"), dm.dataset("val")
        train_ids = [train[i]["id"] for i in range(len(train))]
        val_ids = [val[i]["id"] for i in range(len(val))]
        assert sorted(train_ids + val_ids) == pool_ids and not set(train_ids) & set(val_ids)
        assert [val[i]["index"] for i in range(len(val))] == list(range(len(val)))
        validated += val_ids
        pool_index = int(val_ids[0][-5:])
        torch.testing.assert_close(val[0]["image"], pool[pool_index]["image"])
        assert torch.equal(val.sample_oracle(0, 5, 1), pool.sample_oracle(pool_index, 5, 1))
        test = dm.dataset("test")
        assert [test[i]["id"] for i in range(3)] == [plain.dataset("test")[i]["id"] for i in range(3)]
        torch.testing.assert_close(test[2]["image"], plain.dataset("test")[2]["image"])
    assert sorted(validated) == pool_ids
    with pytest.raises(ValueError, match="fold must be None or in 0..2"):
        SyntheticDataModule(fold=3)
