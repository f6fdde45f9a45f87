"""``PaperAugmentation``: geometry against hand-made references, intensity formulas, ranges, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from probseg.data.transforms import GEOMETRIC, IDENTITY, PAPER_RANGES, PaperAugmentation, build_augmentation
from tests.tolerances import unit_roundoff


def _discs(b: int, r: int, h: int = 32, w: int = 32, seed: int = 0, classes: int = 2) -> torch.Tensor:
    """(B, R, H, W) int64 masks: one disc per rater (class 1) with a smaller concentric disc of class 2."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cy = h / 2 + (torch.rand(b, r, 1, 1, generator=g) - 0.5) * h / 3
    cx = w / 2 + (torch.rand(b, r, 1, 1, generator=g) - 0.5) * w / 3
    radius = min(h, w) * (0.15 + 0.15 * torch.rand(b, r, 1, 1, generator=g))
    dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    masks = (dist <= radius).long()
    if classes > 2:
        masks = masks + (dist <= radius / 2).long()
    return masks


def _batch(b: int = 3, c: int = 2, r: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, c, h, w, generator=g),
        "masks": _discs(b, r, h, w, seed, classes=3),
        "rater_mask": torch.ones(b, r, dtype=torch.bool),
        "index": torch.arange(b),
        "id": [f"case{i}" for i in range(b)],
    }


def _warp_tolerance(image: torch.Tensor) -> float:
    """How far a float32 bilinear warp that should land exactly on pixel centres (a right-angle
    turn, an integer shift, the identity) can be from the exact permutation of the pixels.

    The sampling coordinates go through about 20 float32 roundings of values up to H + W
    (composing the affine matrix, where even cos(pi / 2) is 4e-8 and not 0; inverting it;
    normalising to [-1, 1] and back), so they are off by at most 20 u (H + W) pixels. Bilinear
    weights that far from 0 / 1 move a value by that times the largest difference between
    neighbouring pixels, along each axis; the interpolation and the minimum shift round a few times more.
    """
    u = unit_roundoff(torch.float32)
    h, w = image.shape[-2:]
    offset = 20 * u * (h + w)
    step = max(image.diff(dim=-1).abs().max().item(), image.diff(dim=-2).abs().max().item())
    return 2 * offset * step + 8 * u * 2 * image.abs().max().item()


# --- geometry ------------------------------------------------------------------------------------


def test_masks_follow_the_image_geometry_rater_by_rater() -> None:
    """Each rater mask, warped as a mask (nearest) and as an image (bilinear), gives the same shape."""
    b, r = 6, 3
    masks = _discs(b, r, seed=1)
    aug = PaperAugmentation()
    drawn = aug.sample_parameters(b, "cpu", torch.Generator().manual_seed(2))
    geometry = {name: drawn[name] for name in GEOMETRIC}
    # The masks double as an R-channel image, so channel k of the image is rater k's mask.
    out = aug({"image": masks.float(), "masks": masks}, params=geometry)
    assert out["masks"].dtype == masks.dtype
    assert out["masks"].shape == masks.shape
    for k in range(r):
        nearest, bilinear = out["masks"][:, k], out["image"][:, k]
        agreement = ((bilinear > 0.5) == (nearest == 1)).float().mean()
        assert agreement > 0.98, f"rater {k}: only {agreement:.3f} of the pixels agree"
        # The nearest source pixel has bilinear weight >= 1/4, so a bilinear value above 3/4
        # (below 1/4) forces the nearest value to 1 (to 0): no disagreement off the boundary.
        assert (nearest[bilinear > 0.75 + 1e-4] == 1).all()
        assert (nearest[bilinear < 0.25 - 1e-4] == 0).all()
        assert (nearest == 1).any(), "the test shape left the image: pick smaller parameters"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_masks_keep_their_dtype_and_values(dtype: torch.dtype) -> None:
    batch = _batch()
    batch["masks"] = batch["masks"].to(dtype)
    out = PaperAugmentation()(batch, generator=torch.Generator().manual_seed(0))
    assert out["masks"].dtype == dtype
    assert set(out["masks"].unique().tolist()) <= {0, 1, 2}
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == batch["image"].dtype


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3)])
def test_rotation_by_right_angles_is_rot90_counter_clockwise(angle: float, k: int) -> None:
    batch = _batch()
    out = PaperAugmentation()(batch, params={"rotation": angle})
    torch.testing.assert_close(out["image"], torch.rot90(batch["image"], k, dims=(-2, -1)), atol=_warp_tolerance(batch["image"]), rtol=0)
    assert torch.equal(out["masks"], torch.rot90(batch["masks"], k, dims=(-2, -1)))


def test_rotation_direction_as_displayed() -> None:
    """+90 degrees takes the top-right corner to the top-left one (counter-clockwise on screen)."""
    masks = torch.zeros(1, 1, 5, 5, dtype=torch.long)
    masks[0, 0, 0, 4] = 1
    out = PaperAugmentation()({"image": masks.float(), "masks": masks}, params={"rotation": 90.0})
    assert out["masks"][0, 0, 0, 0] == 1 and out["masks"].sum() == 1


@pytest.mark.parametrize(("dy", "dx"), [(0, 3), (2, 0), (-2, 5), (4, -3)])
def test_integer_translation_is_a_roll_with_fill(dy: int, dx: int) -> None:
    """Translation in fractions of W (x) and H (y); uncovered pixels: class 0 and the image minimum."""
    h, w = 24, 32  # not square, so x and y cannot be swapped unnoticed
    batch = _batch(h=h, w=w)
    out = PaperAugmentation()(batch, params={"translation": torch.tensor([dx / w, dy / h])})

    expected_masks = torch.roll(batch["masks"], (dy, dx), dims=(-2, -1))
    expected_image = torch.roll(batch["image"], (dy, dx), dims=(-2, -1))
    uncovered = torch.zeros(h, w, dtype=torch.bool)
    uncovered[:dy] = dy > 0
    uncovered[h + dy :] = dy < 0
    uncovered[:, :dx] |= dx > 0
    uncovered[:, w + dx :] |= dx < 0
    expected_masks[..., uncovered] = 0
    minimum = batch["image"].amin(dim=(-2, -1))  # (B, C), the fill of each image channel
    expected_image = torch.where(uncovered, minimum[..., None, None], expected_image)

    assert torch.equal(out["masks"], expected_masks)
    torch.testing.assert_close(out["image"], expected_image, atol=_warp_tolerance(batch["image"]), rtol=0)


def _forward_map(point: torch.Tensor, center: torch.Tensor, p: dict, size: tuple[int, int]) -> torch.Tensor:
    """The documented forward mapping p' = c + t + s R Sh (p - c), written out by hand (x right, y down)."""
    h, w = size
    a = math.radians(p["rotation"])
    tx, ty = (math.tan(math.radians(s)) for s in p["shear"])
    dx, dy = (point - center).tolist()
    x1 = dx - tx * dy  # shear in x, then in y
    y1 = dy - ty * x1
    # Counter-clockwise on screen with y pointing down.
    xr = math.cos(a) * x1 + math.sin(a) * y1
    yr = -math.sin(a) * x1 + math.cos(a) * y1
    s = p["scaling"]
    return center + torch.tensor([s * xr + p["translation"][0] * w, s * yr + p["translation"][1] * h])


@pytest.mark.parametrize(
    "p",
    [
        {"rotation": 37.0, "scaling": 1.1, "shear": (0.0, 0.0), "translation": (0.05, -0.03)},
        {"rotation": 0.0, "scaling": 1.0, "shear": (20.0, 0.0), "translation": (0.0, 0.0)},
        {"rotation": 0.0, "scaling": 1.0, "shear": (0.0, -25.0), "translation": (0.0, 0.0)},
        {"rotation": -120.0, "scaling": 0.85, "shear": (12.0, -18.0), "translation": (-0.06, 0.08)},
    ],
)
def test_full_affine_moves_a_blob_to_the_hand_computed_point(p: dict) -> None:
    """The centroid of a Gaussian blob lands where the hand-written mapping sends its center.

    Checks composition order, degrees (not radians) for rotation and shear, pixel translation and
    the rotation center at once; an affine map sends a blob's centroid to the centroid's image.
    """
    h, w = 40, 48
    center = torch.tensor([(w - 1) / 2, (h - 1) / 2])
    source = center + torch.tensor([5.0, -3.0])
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    blob = torch.exp(-((xx - source[0]) ** 2 + (yy - source[1]) ** 2) / (2 * 1.5**2))
    batch = {"image": blob[None, None], "masks": torch.zeros(1, 1, h, w, dtype=torch.long)}
    params = {key: torch.tensor(value) for key, value in p.items()}
    out = PaperAugmentation()(batch, params=params)["image"][0, 0]
    out = out - out.min()
    centroid = torch.stack([(out * xx).sum(), (out * yy).sum()]) / out.sum()
    expected = _forward_map(source, center, p, (h, w))
    torch.testing.assert_close(centroid, expected, atol=0.1, rtol=0)


def test_identity_parameters_leave_the_batch_unchanged() -> None:
    batch = _batch()
    params = {name: torch.tensor(value) for name, value in IDENTITY.items()}
    out = PaperAugmentation()(batch, params=params)
    assert torch.equal(out["masks"], batch["masks"])
    torch.testing.assert_close(out["image"], batch["image"], atol=_warp_tolerance(batch["image"]), rtol=0)


def test_fully_disabled_augmentation_is_exactly_the_identity() -> None:
    aug = PaperAugmentation(
        rotation=None, translation=(0, 0), scaling=(1, 1), shear=None, brightness=None, gamma=(1.0, 1.0)
    )
    assert not any(aug.enabled(name) for name in PAPER_RANGES)
    batch = _batch()
    out = aug(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["image"], batch["image"])
    assert torch.equal(out["masks"], batch["masks"])


# --- intensity -----------------------------------------------------------------------------------


def test_brightness_multiplies_the_image() -> None:
    batch = _batch(b=2)
    factor = torch.tensor([0.8, 1.2])
    out = PaperAugmentation()(batch, params={"brightness": factor})
    torch.testing.assert_close(out["image"], batch["image"] * factor.view(2, 1, 1, 1))
    assert torch.equal(out["masks"], batch["masks"])


def test_gamma_on_a_unit_range_image_is_the_power() -> None:
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 2, 32, 32, generator=g)
    image[..., 0, 0], image[..., 0, 1] = 0.0, 1.0  # every channel spans exactly [0, 1]
    batch = {"image": image, "masks": torch.zeros(2, 1, 32, 32, dtype=torch.long)}
    gamma = torch.tensor([0.5, 1.5])
    out = PaperAugmentation()(batch, params={"gamma": gamma})
    torch.testing.assert_close(out["image"], image ** gamma.view(2, 1, 1, 1), atol=1e-6, rtol=0)


def test_gamma_on_another_range_keeps_min_and_max_and_follows_the_formula() -> None:
    g = torch.Generator().manual_seed(4)
    image = 3 * torch.randn(2, 3, 32, 32, generator=g) - 2  # negative values, not in [0, 1]
    gamma = torch.tensor([0.6, 1.4])
    batch = {"image": image, "masks": torch.zeros(2, 1, 32, 32, dtype=torch.long)}
    out_image = PaperAugmentation()(batch, params={"gamma": gamma})["image"]
    low, high = image.amin(dim=(-2, -1), keepdim=True), image.amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(out_image.amin(dim=(-2, -1), keepdim=True), low)
    torch.testing.assert_close(out_image.amax(dim=(-2, -1), keepdim=True), high)
    expected = low + (high - low) * ((image - low) / (high - low)) ** gamma.view(2, 1, 1, 1)
    torch.testing.assert_close(out_image, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out_image, image, atol=1e-2), "gamma != 1 must change the image"


def test_gamma_leaves_constant_channels_finite_and_unchanged() -> None:
    image = torch.full((2, 1, 8, 8), -0.7)
    batch = {"image": image, "masks": torch.zeros(2, 1, 8, 8, dtype=torch.long)}
    out = PaperAugmentation()(batch, params={"gamma": 0.5})
    assert torch.isfinite(out["image"]).all()
    assert torch.equal(out["image"], image)


def test_random_augmentation_of_a_constant_image_stays_finite() -> None:
    batch = {"image": torch.zeros(4, 1, 16, 16), "masks": torch.zeros(4, 2, 16, 16, dtype=torch.long)}
    out = PaperAugmentation()(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["image"]).all()
    assert (out["image"] == 0).all() and (out["masks"] == 0).all()


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ranges",
    [
        PAPER_RANGES,
        {"rotation": (10.0, 20.0), "translation": (-0.2, 0.05), "scaling": (0.5, 0.6), "shear": (0.0, 5.0),
         "brightness": (1.0, 3.0), "gamma": (0.9, 1.1)},
    ],
)
def test_parameters_cover_their_ranges(ranges: dict) -> None:
    n = 20_000
    params = PaperAugmentation(**ranges).sample_parameters(n, "cpu", torch.Generator().manual_seed(5))
    assert set(params) == set(PAPER_RANGES)
    for name, (low, high) in ranges.items():
        value = params[name]
        assert value.shape == ((n, 2) if name in ("translation", "shear") else (n,)), name
        assert value.dtype == torch.float32
        assert (value >= low).all() and (value <= high).all(), name
        span = high - low
        # Uniform: the extremes come close to the bounds and the mean sits in the middle.
        assert (value.amin(0) < low + 0.01 * span).all() and (value.amax(0) > high - 0.01 * span).all(), name
        assert ((value.mean(0) - (low + high) / 2).abs() < 0.02 * span).all(), name
    if "translation" in ranges:
        # x and y are drawn independently, not shared.
        assert not torch.equal(params["translation"][:, 0], params["translation"][:, 1])
        assert not torch.equal(params["shear"][:, 0], params["shear"][:, 1])


def test_disabled_parts_stay_at_the_identity() -> None:
    aug = PaperAugmentation(rotation=None, shear=(0.0, 0.0), gamma=None, brightness=(1.0, 1.0))
    params = aug.sample_parameters(100, "cpu", torch.Generator().manual_seed(6))
    for name in ("rotation", "shear", "gamma", "brightness"):
        assert not aug.enabled(name)
        assert (params[name] == IDENTITY[name]).all(), name
    for name in ("translation", "scaling"):
        assert aug.enabled(name)
        assert params[name].unique().numel() > 1, name


def test_a_constant_non_identity_range_is_applied() -> None:
    aug = PaperAugmentation(scaling=(1.1, 1.1))
    assert aug.enabled("scaling")
    assert (aug.sample_parameters(10)["scaling"] == 1.1).all()


def test_same_seed_same_output_other_seed_other_output() -> None:
    batch, aug = _batch(), PaperAugmentation()
    first = aug(batch, generator=torch.Generator().manual_seed(7))
    second = aug(batch, generator=torch.Generator().manual_seed(7))
    other = aug(batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["masks"], second["masks"])
    assert not torch.equal(first["image"], other["image"]) and not torch.equal(first["masks"], other["masks"])


def test_global_rng_is_used_without_a_generator() -> None:
    batch, aug = _batch(), PaperAugmentation()
    torch.manual_seed(9)
    first = aug(batch)
    torch.manual_seed(9)
    second = aug(batch)
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["masks"], second["masks"])


def test_drawing_inside_forward_equals_passing_the_drawn_parameters() -> None:
    batch, aug = _batch(), PaperAugmentation()
    drawn = aug.sample_parameters(3, "cpu", torch.Generator().manual_seed(10))
    via_params = aug(batch, params=drawn)
    via_generator = aug(batch, generator=torch.Generator().manual_seed(10))
    assert torch.equal(via_params["image"], via_generator["image"])
    assert torch.equal(via_params["masks"], via_generator["masks"])


def test_other_keys_pass_through_and_the_input_is_not_modified() -> None:
    batch = _batch()
    before = {key: value.clone() for key, value in batch.items() if isinstance(value, torch.Tensor)}
    out = PaperAugmentation()(batch, generator=torch.Generator().manual_seed(11))
    assert out is not batch
    for key in ("rater_mask", "index", "id"):
        assert out[key] is batch[key]
    for key, value in before.items():
        assert torch.equal(batch[key], value), f"batch[{key!r}] was modified"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_batch_device() -> None:
    batch = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in _batch().items()}
    aug = PaperAugmentation()
    out = aug(batch, generator=torch.Generator(device="cuda").manual_seed(0))
    assert out["image"].device == batch["image"].device and out["masks"].device == batch["masks"].device
    # A CPU generator draws on the CPU and gives the same result on either device.
    cpu = aug(_batch(), generator=torch.Generator().manual_seed(1))
    gpu = aug(batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu["image"].cpu(), cpu["image"], atol=2 * _warp_tolerance(cpu["image"]), rtol=0)
    assert (gpu["masks"].cpu() != cpu["masks"]).float().mean() < 0.01  # ties may round differently


# --- validation and config -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rotation": (10.0, -10.0)}, "rotation must have low <= high"),
        ({"scaling": (0.0, 1.2)}, "scaling must be positive"),
        ({"brightness": (-1.0, 1.0)}, "brightness must be positive"),
        ({"gamma": (0.0, 1.0)}, "gamma must be positive"),
        ({"shear": (-90.0, 30.0)}, "shear must lie strictly between"),
        ({"translation": (0.1,)}, "translation must be a \\(low, high\\) pair"),
        ({"translation": "0.1"}, "translation must be a \\(low, high\\) pair"),
        ({"rotation": (0.0, float("inf"))}, "rotation bounds must be finite numbers"),
        ({"gamma": (True, 2.0)}, "gamma bounds must be finite numbers"),
    ],
)
def test_invalid_ranges_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PaperAugmentation(**kwargs)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image": torch.zeros(2, 16, 16)}, "batch\\['image'\\] must be a \\(B, C, H, W\\) float"),
        ({"image": torch.zeros(2, 1, 16, 16, dtype=torch.long)}, "batch\\['image'\\] must be a \\(B, C, H, W\\) float"),
        ({"masks": torch.zeros(2, 3, 16, 16)}, "batch\\['masks'\\] must be a \\(B, R, H, W\\) integer"),
        ({"masks": torch.zeros(2, 16, 16, dtype=torch.long)}, "batch\\['masks'\\] must be a \\(B, R, H, W\\) integer"),
        ({"masks": torch.zeros(3, 2, 16, 16, dtype=torch.long)}, "must agree in B, H and W"),
        ({"masks": torch.zeros(2, 2, 16, 15, dtype=torch.long)}, "must agree in B, H and W"),
    ],
)
def test_invalid_batches_are_rejected(change: dict, match: str) -> None:
    batch = {"image": torch.zeros(2, 1, 16, 16), "masks": torch.zeros(2, 2, 16, 16, dtype=torch.long), **change}
    with pytest.raises(ValueError, match=match):
        PaperAugmentation()(batch)


def test_a_batch_without_masks_is_rejected() -> None:
    with pytest.raises(KeyError, match="no 'masks' entry"):
        PaperAugmentation()({"image": torch.zeros(2, 1, 16, 16)})


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"rotate": 90.0}, "unknown augmentation parameter 'rotate'"),
        ({"rotation": torch.zeros(3)}, "params\\['rotation'\\] of shape \\(3,\\) does not broadcast to \\(2,\\)"),
        ({"shear": torch.zeros(2, 3)}, "params\\['shear'\\]"),
    ],
)
def test_invalid_parameters_are_rejected(params: dict, match: str) -> None:
    batch = {"image": torch.zeros(2, 1, 16, 16), "masks": torch.zeros(2, 2, 16, 16, dtype=torch.long)}
    with pytest.raises(ValueError, match=match):
        PaperAugmentation()(batch, params=params)


def test_build_augmentation_from_config() -> None:
    assert build_augmentation(None) is None
    assert build_augmentation(False) is None
    assert build_augmentation(True).ranges == PAPER_RANGES
    assert build_augmentation({}).ranges == PAPER_RANGES
    custom = build_augmentation({"rotation": [-90, 90], "gamma": None})
    assert custom.ranges["rotation"] == (-90.0, 90.0)
    assert custom.ranges["gamma"] is None and not custom.enabled("gamma")
    assert custom.ranges["scaling"] == PAPER_RANGES["scaling"]
    module = PaperAugmentation(rotation=None)
    assert build_augmentation(module) is module


def test_build_augmentation_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown augmentation option 'rotate'.*allowed: .*'rotation'"):
        build_augmentation({"rotate": [-90, 90]})
    with pytest.raises(ValueError, match="scaling must be positive"):
        build_augmentation({"scaling": [0, 1]})
    with pytest.raises(TypeError, match="augmentation config must be"):
        build_augmentation("paper")


def test_data_modules_augment_training_batches_only() -> None:
    """``augmentation`` in a data module's YAML: training batches are transformed on their device
    (image and masks together), validation batches never; off by default."""
    from types import SimpleNamespace

    from probseg.data import SyntheticDataModule

    dm = SyntheticDataModule(image_size=32, num_train=4, num_val=2, num_test=2, batch_size=4,
                             augmentation={"rotation": [90, 90], "translation": None, "scaling": None, "shear": None,
                                           "brightness": None, "gamma": None})
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)
    out = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(out["masks"], torch.rot90(batch["masks"], 1, dims=(-2, -1)))
    assert SyntheticDataModule().augmentation is None


def test_ddp_ranks_draw_different_augmentations() -> None:
    """Ranks share Lightning's seed; their augmentation generators must still differ."""
    from types import SimpleNamespace

    from probseg.data import SyntheticDataModule

    batch = next(iter(SyntheticDataModule(image_size=32, num_train=4, batch_size=4).train_dataloader()))
    outs = []
    for rank in (0, 1, 0):
        torch.manual_seed(0)  # Lightning's seed, the same on every rank
        dm = SyntheticDataModule(image_size=32, num_train=4, batch_size=4, augmentation=True)
        dm.trainer = SimpleNamespace(training=True, global_rank=rank)
        outs.append(dm.on_after_batch_transfer(dict(batch), 0)["image"])
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
