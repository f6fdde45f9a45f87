"""The network interface of the zoo: a plain ``nn.Module`` (no Lightning) per model.

A network builds its parts from :mod:`probseg.layers` and knows nothing of training: the task
(:class:`probseg.models.base.ProbSegModel`) calls :meth:`Network.forward` on a batch and hands
the returned dict to its objectives (:mod:`probseg.models.objectives`); callbacks and users call
:meth:`Network.sample` through the task.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from probseg.layers.gaussian import Generators

NetworkOutput = dict[str, Any]
"""What a network's forward pass returns to its objectives: always ``"logits"`` (B, K, H, W), the
reconstruction of the training target; latent models add their distributions and samples
(``"posterior"``, ``"prior"``, ...), as each model's docstring lists."""


class Network(nn.Module):
    """Base class of the zoo's networks.

    A network implements:

    * :meth:`forward`: the training pass over a batch and its fused target, returning a
      :data:`NetworkOutput` (the tensors and distributions its objectives need; nothing is kept
      on ``self`` between calls);
    * :meth:`sample`: S hypotheses per image, (B, S, K, H, W) logits;
    * :meth:`sample_weighted` when its hypotheses carry weights (a mixture, e.g. MoSE; set
      :attr:`weighted`); every other network's hypotheses weigh 1 / S each;
    * optionally :meth:`prior_sigmas` (the Gini index of latent models) and :attr:`deterministic`.
    """

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        """The training pass.

        Args:
            batch: the batch dict (``image``, ``masks``, optional ``rater_mask``).
            target: the fused training target, (B, H, W) class ids or (B, K, H, W) probabilities.
            generator: source of every random draw (None: torch's global RNG).
        """
        raise NotImplementedError

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, S, K, H, W) logits of S hypotheses per image."""
        raise NotImplementedError

    weighted: bool = False
    """True when :meth:`sample_weighted` gives non-uniform weights (evaluation then weights the
    set metrics); False: every hypothesis weighs 1 / S."""

    def sample_weighted(self, images: torch.Tensor, num_samples: int = 16,
                        generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """S hypotheses and their weights: (B, S, K, H, W) logits and (B, S) float32 weights that
        sum to 1 per image (uniform, 1 / S, unless the network overrides this)."""
        logits = self.sample(images, num_samples, generator)
        return logits, torch.full(logits.shape[:2], 1 / num_samples, device=logits.device)

    @property
    def deterministic(self) -> bool:
        """True when every hypothesis of an image is the same (e.g. a U-Net without dropout)."""
        return False

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor | None:
        """Singular values of the prior p(z|x), (B, L), for the Gini index; None without a prior."""
        return None

    def prior_sigmas_per_level(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """{"level<l>": (B, n_l)} prior sigmas of each latent level of a hierarchical model (the
        Gini index per level); None for a model with one latent level or none."""
        return None

    def predictive_log_probabilities(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None,
                                     outputs: NetworkOutput | None = None) -> torch.Tensor:
        """Log of the pixel-wise predictive probabilities, the mean softmax of ``num_samples``
        hypotheses (one for a deterministic network), (B, K, H, W), differentiable.

        Args:
            outputs: this step's :meth:`forward` outputs for the same images; a network whose
                training pass already is its predictive returns it instead of running again, one
                whose training pass computed what its hypotheses start from (a PU-Net's U-Net
                features and prior) reuses that.
        """
        return log_mean_softmax(self.sample(images, 1 if self.deterministic else num_samples, generator))


def log_mean_softmax(samples: torch.Tensor) -> torch.Tensor:
    """Log of the mean softmax of a set of hypotheses, in float32.

    .. math:: \\log \\bar p = \\log \\frac{1}{S} \\sum_s \\mathrm{softmax}(\\ell_s)

    Args:
        samples: (B, S, K, H, W) logits.

    Returns:
        (B, K, H, W) log-probabilities (logsumexp over the set, so a class that one hypothesis
        gives all its mass stays finite).
    """
    log_probs = samples.float().log_softmax(dim=2)
    if log_probs.shape[1] == 1:
        return log_probs[:, 0]
    return log_probs.logsumexp(dim=1) - math.log(log_probs.shape[1])
