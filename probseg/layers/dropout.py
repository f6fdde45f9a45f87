"""Channel dropout with explicit generators, for MC-dropout hypotheses.

``nn.Dropout2d`` draws from torch's global RNG and cannot give one image the same hypotheses in
any batch; these masks take the zoo's ``Generators`` (one generator, or one per image) like
:func:`probseg.layers.gaussian.sample_set`.
"""

from __future__ import annotations

import torch

from probseg.layers.gaussian import Generators


def channel_dropout_masks(
    batch: int, num_samples: int, channels: int, p: float, generator: Generators = None,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverted-dropout channel masks: each entry is 0 with probability ``p``, else ``1 / (1 - p)``.

    Args:
        batch: B.
        num_samples: S masks per image.
        channels: C.
        p: drop probability in [0, 1).
        generator: None (torch's RNG), a torch.Generator, or a sequence of B generators (image
            b's masks then depend on its own generator only).
        device, dtype: of the masks.

    Returns:
        (B, S, C) masks; multiplying features by them keeps their expectation.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    shape = (batch, num_samples, channels)
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for a batch of {batch} images")
        u = torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=torch.float32) for g in generators])
    return (u >= p).to(dtype) / (1 - p)
