"""Batched data augmentation of the cSAE paper (Valiuddin et al., "Retained Singular Values...", Table 5).

:class:`PaperAugmentation` draws, per image, one affine transform (rotation, isotropic scaling,
shear in x and y, translation, all about the image center) and two intensity changes
(multiplicative brightness, gamma). The paper's ranges are the defaults:

============  ===================  ==========================================
part          default range        meaning
============  ===================  ==========================================
rotation      -180 .. 180          degrees, positive = counter-clockwise
translation   -0.1 .. 0.1          fraction of the width (x) and height (y)
scaling       0.8 .. 1.2           isotropic zoom factor
shear         -30 .. 30            degrees, drawn independently in x and y
brightness    0.8 .. 1.2           factor multiplying the intensities
gamma         0.5 .. 1.5           exponent on the per-channel min-max range
============  ===================  ==========================================

Everything runs on the batch's device on whole batches (one :func:`kornia` warp per batch), so
the augmentation can run on the GPU after the batch is transferred.

Conventions (checked by the tests):

* Geometry: the forward mapping of a pixel ``p = (x, y)`` (x rightwards, y downwards, in pixels,
  image center ``c = ((W - 1) / 2, (H - 1) / 2)``) is ``p' = c + t + s R(a) Sh (p - c)``: first the
  shear ``Sh`` (``x1 = x - tan(shear_x) y``, then ``y1 = y - tan(shear_y) x1``, kornia's
  convention), then rotation by ``a`` and scaling by ``s``, then translation by ``t``.
* Rotation by +90 degrees equals ``torch.rot90(x, 1, dims=(-2, -1))`` (counter-clockwise as
  displayed). A translation of +k pixels in x equals rolling the columns by +k.
* The image is warped bilinearly; pixels coming from outside the image get the image's minimum
  (per image and channel), so the warp never leaves the image's intensity range. The rater masks
  are warped with nearest-neighbour interpolation, keep their integer dtype, and pixels from
  outside get class 0 (background).
* Brightness multiplies the intensities. Gamma maps each image channel to [0, 1] by its minimum
  and maximum, raises it to the power ``gamma`` and maps it back, because images here need not lie
  in [0, 1] (noise can make them negative); min and max are kept and a constant channel stays
  unchanged. With a positive brightness factor the two intensity changes commute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from kornia.geometry.transform import get_affine_matrix2d, warp_affine

from probseg._config import optional_component
from probseg.data.batch import check_batch_layout

Range = tuple[float, float]

PAPER_RANGES: dict[str, Range] = {
    "rotation": (-180.0, 180.0),
    "translation": (-0.1, 0.1),
    "scaling": (0.8, 1.2),
    "shear": (-30.0, 30.0),
    "brightness": (0.8, 1.2),
    "gamma": (0.5, 1.5),
}
"""The augmentation ranges of the paper (Table 5), the defaults of :class:`PaperAugmentation`."""

IDENTITY: dict[str, float] = {
    "rotation": 0.0,
    "translation": 0.0,
    "scaling": 1.0,
    "shear": 0.0,
    "brightness": 1.0,
    "gamma": 1.0,
}
"""The parameter value of each part that leaves the image unchanged."""

GEOMETRIC = ("rotation", "translation", "scaling", "shear")
PAIRED = ("translation", "shear")  # drawn as (x, y) pairs: parameters of shape (B, 2)
_POSITIVE = ("scaling", "brightness", "gamma")


def _check_range(name: str, value: Any) -> Range | None:
    """Validate one (low, high) range of :class:`PaperAugmentation`; None passes through."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair or None, got {value!r}")
    low, high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, Real) or not math.isfinite(bound):
            raise ValueError(f"{name} bounds must be finite numbers, got {value!r}")
    low, high = float(low), float(high)
    if low > high:
        raise ValueError(f"{name} must have low <= high, got ({low}, {high})")
    if name in _POSITIVE and low <= 0:
        raise ValueError(f"{name} must be positive (low > 0), got ({low}, {high})")
    if name == "shear" and not (-90.0 < low and high < 90.0):
        # tan diverges at +-90 degrees: the image would be sheared to a line.
        raise ValueError(f"shear must lie strictly between -90 and 90 degrees, got ({low}, {high})")
    return low, high


class PaperAugmentation(torch.nn.Module):
    """Random affine and intensity augmentation of image and rater masks, per image of a batch.

    See the module docstring for the conventions. Each image draws its own parameters, uniformly
    in the ranges; all R rater masks of an image get the image's geometry. A part whose range is
    None, or ``(v, v)`` with ``v`` its identity value (0 for rotation, translation and shear,
    1 for scaling, brightness and gamma), is off: its parameters stay at the identity and it is
    skipped. Apply the module to training batches only; it augments whenever it is called.

    Args:
        rotation: (low, high) rotation angle in degrees, positive counter-clockwise.
        translation: (low, high) shift as a fraction of the image width (x) and height (y),
            drawn independently for x and y; positive moves the content right / down.
        scaling: (low, high) isotropic scale factor, low > 0.
        shear: (low, high) shear angle in degrees, drawn independently for x and y,
            within (-90, 90).
        brightness: (low, high) factor multiplying the intensities, low > 0.
        gamma: (low, high) gamma exponent, low > 0.

    Raises:
        ValueError: if a range is not a pair of finite numbers with low <= high, or a positive
            quantity has low <= 0.
    """

    def __init__(
        self,
        rotation: Range | None = PAPER_RANGES["rotation"],
        translation: Range | None = PAPER_RANGES["translation"],
        scaling: Range | None = PAPER_RANGES["scaling"],
        shear: Range | None = PAPER_RANGES["shear"],
        brightness: Range | None = PAPER_RANGES["brightness"],
        gamma: Range | None = PAPER_RANGES["gamma"],
    ) -> None:
        super().__init__()
        given = {
            "rotation": rotation,
            "translation": translation,
            "scaling": scaling,
            "shear": shear,
            "brightness": brightness,
            "gamma": gamma,
        }
        self.ranges: dict[str, Range | None] = {name: _check_range(name, value) for name, value in given.items()}

    def enabled(self, name: str) -> bool:
        """Whether part ``name`` (a key of :data:`PAPER_RANGES`) changes anything."""
        bounds = self.ranges[name]
        return bounds is not None and bounds != (IDENTITY[name], IDENTITY[name])

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={bounds}" for name, bounds in self.ranges.items())

    def sample_parameters(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Draw each image's parameters uniformly in the ranges.

        Draws come from ``generator`` when given (on the generator's device, then moved to
        ``device``), else from torch's global RNG (seeded by Lightning's ``seed_everything``).
        Parts that are off take no draws and hold their identity value.

        Args:
            batch_size: B, images in the batch.
            device: device of the returned tensors (None: the default device).
            generator: optional torch.Generator.

        Returns:
            float32 tensors keyed by part: ``rotation``, ``scaling``, ``brightness``, ``gamma``
            of shape (B,), ``translation`` and ``shear`` of shape (B, 2) as (x, y) pairs.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        draw_device = generator.device if generator is not None else device
        params = {}
        for name, bounds in self.ranges.items():
            shape = (batch_size, 2) if name in PAIRED else (batch_size,)
            if self.enabled(name):
                low, high = bounds
                u = torch.rand(shape, generator=generator, device=draw_device)
                params[name] = (low + (high - low) * u).to(device)
            else:
                params[name] = torch.full(shape, IDENTITY[name], device=device)
        return params

    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Augment a batch.

        Args:
            batch: ``image`` (B, C, H, W) float, ``masks`` (B, R, H, W) integer class ids; other
                keys (``rater_mask``, ``id``, ``index``, ...) pass through unchanged.
            generator: optional torch.Generator for the draws (see :meth:`sample_parameters`).
            params: parameters to apply instead of drawing them, keyed as the output of
                :meth:`sample_parameters`; each value broadcasts to its shape (a number applies
                to every image). Parts absent from ``params`` are skipped (identity).

        Returns:
            A new dict with the augmented ``image`` (same shape and dtype) and ``masks`` (same
            shape and dtype, values among the input's values and 0) and the other entries of
            ``batch``. The input tensors are not modified.

        Shape:
            - image: (B, C, H, W)
            - masks: (B, R, H, W)
        """
        image, masks = check_batch_layout(batch)
        b, _, h, w = image.shape
        if params is None:
            drawn = self.sample_parameters(b, image.device, generator)
            p = {name: value for name, value in drawn.items() if self.enabled(name)}
        else:
            p = _check_params(params, b, image.device)

        # Half-precision grids are off by pixels at medical image sizes: compute in float32 at least.
        out = image.to(torch.promote_types(image.dtype, torch.float32))
        if any(name in p for name in GEOMETRIC):
            matrix = _affine_matrix(p, b, h, w, image.device).to(out.dtype)
            out, masks = _warp(out, masks, matrix)
        if "brightness" in p:
            out = out * p["brightness"].to(out.dtype).view(b, 1, 1, 1)
        if "gamma" in p:
            out = _gamma(out, p["gamma"].to(out.dtype).view(b, 1, 1, 1))
        return {**batch, "image": out.to(image.dtype), "masks": masks}


def _check_params(params: Mapping[str, Any], batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Broadcast given parameters to their (B,) or (B, 2) shapes as float32 on ``device``."""
    checked = {}
    for name, value in params.items():
        if name not in IDENTITY:
            raise ValueError(f"unknown augmentation parameter {name!r}; allowed: {sorted(IDENTITY)}")
        shape = (batch_size, 2) if name in PAIRED else (batch_size,)
        tensor = torch.as_tensor(value, dtype=torch.float32, device=device)
        try:
            checked[name] = torch.broadcast_to(tensor, shape)
        except RuntimeError as error:
            message = f"params[{name!r}] of shape {tuple(tensor.shape)} does not broadcast to {shape}"
            raise ValueError(message) from error
    return checked


def _affine_matrix(
    params: Mapping[str, torch.Tensor], batch_size: int, height: int, width: int, device: torch.device
) -> torch.Tensor:
    """(B, 2, 3) source-to-destination pixel matrices of the geometric parameters."""

    def get(name: str) -> torch.Tensor:
        shape = (batch_size, 2) if name in PAIRED else (batch_size,)
        if name in params:
            return params[name].to(device=device, dtype=torch.float32)
        return torch.full(shape, IDENTITY[name], device=device)

    # With align_corners=True pixel centers sit at integer coordinates 0..W-1, so (W-1)/2 is the
    # center and a 90-degree turn of a square image maps the pixel grid onto itself.
    center = torch.tensor([(width - 1) / 2, (height - 1) / 2], device=device).expand(batch_size, 2)
    size = torch.tensor([width, height], dtype=torch.float32, device=device)
    scale = get("scaling")[:, None].expand(batch_size, 2)
    shear = torch.deg2rad(get("shear"))  # kornia takes shear in radians but rotation in degrees
    # get_affine_matrix2d turns positive angles clockwise as displayed; negate for counter-clockwise.
    matrix = get_affine_matrix2d(
        get("translation") * size, center, scale, -get("rotation"), sx=shear[:, 0], sy=shear[:, 1]
    )
    return matrix[:, :2, :]


def _warp(image: torch.Tensor, masks: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp the image bilinearly (minimum fill) and the masks by nearest neighbour (class-0 fill)."""
    size = tuple(image.shape[-2:])
    # Zero padding of (image - min), then adding min back, fills with the per-channel minimum.
    low = image.amin(dim=(-2, -1), keepdim=True)
    warped = warp_affine(image - low, matrix, size, mode="bilinear", padding_mode="zeros", align_corners=True)
    # Class ids are exact in float32 (up to 2**24), and nearest sampling only copies them.
    warped_masks = warp_affine(
        masks.to(matrix.dtype), matrix, size, mode="nearest", padding_mode="zeros", align_corners=True
    )
    return warped + low, warped_masks.to(masks.dtype)


def _gamma(image: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Gamma on each image channel min-max normalized to [0, 1], mapped back to its range."""
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    # A constant channel has span 0: dividing by a tiny positive number gives 0, 0**gamma = 0,
    # so it stays at its value instead of becoming NaN.
    unit = ((image - low) / span.clamp_min(torch.finfo(image.dtype).tiny)).clamp(0.0, 1.0)
    return low + span * unit.pow(gamma)


def build_augmentation(config: bool | Mapping[str, Any] | PaperAugmentation | None) -> PaperAugmentation | None:
    """Build the augmentation from a YAML-friendly config.

    Args:
        config: None or False: no augmentation; True: the paper's ranges; a dict: keyword
            arguments of :class:`PaperAugmentation` (ranges as lists or tuples, None switches a
            part off, parts not named keep the paper's range); a :class:`PaperAugmentation` is
            returned as is.

    Returns:
        The augmentation module, or None when augmentation is off.

    Raises:
        ValueError: for a dict key that is not a part name, or an invalid range.
        TypeError: for a config of another type.
    """
    return optional_component(config, PaperAugmentation, "augmentation", PAPER_RANGES,
                              convert=lambda value: tuple(value) if isinstance(value, list) else value)
