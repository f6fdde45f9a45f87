"""cSAE: the conditional Sinkhorn autoencoder.

Valiuddin et al., "Retained Singular Values in Probabilistic Image Segmentation with Normalizing
Flows and Optimal Transport". Planar-flow projector heads sit on BOTH the prior and the posterior,
each amortized from its own encoder. Training minimizes (eq. 12)

.. math::
    \\mathrm{CE}(y, G(x, z_K^q)) + \\beta \\, \\mathrm{KL}(\\mathcal N_q \\,\\|\\, \\mathcal N_p)
    + \\gamma \\, S_\\varepsilon(\\hat Q_Z, \\hat P_Z)

with the KL in closed form between the BASE Normals, and S_eps a GeomLoss Sinkhorn divergence
between N_OT flowed posterior samples and N_OT flowed prior samples of the SAME image (one
(N_OT, L) point cloud pair per image, batched as (B, N_OT, L)). At test time the flows are
discarded: hypotheses decode samples of the base prior.

The paper leaves two choices open; each is an option (``reconstruct_from``,
``sinkhorn_posterior``), and a third one is ours (``sample_through_prior_flow``):

* Which sample reconstructs in training. ``"flowed"``: the flowed posterior sample z_K^q (the
  caption of the paper's Fig. 2: "during training samples are taken from the projected, NF
  transformed latent space"). ``"base"``: the base posterior sample z_0^q (the unhatted
  "Z ~ Q" of eq. 12's reconstruction term, and the projector-head analogy of section 2: a
  projector feeds only the auxiliary loss). Test time decodes base prior samples in both, so
  only ``"base"`` trains the decoder where it is evaluated.
* Which posterior samples enter the Sinkhorn term. ``"one_rater"``: N_OT draws of the
  posterior of the training target (one random rater by default). ``"all_raters"``: the
  aggregate posterior of the image, which Theorem 1 (section 3.2.1, an infimum over Q with
  Q_Z = P_Z) constrains: the N_OT slots are shared out over the image's present raters (round
  robin from a random start, so each present rater gets N_OT / R or one more), each slot a draw
  of that rater's flowed posterior; absent raters (``rater_mask``) never enter.

Checkpoints written before these options existed load with their old behaviour
(``"flowed"``, ``"one_rater"``; see :data:`LEGACY_DEFAULTS`).

GeomLoss's gradients are approximate (envelope theorem), so the Sinkhorn term is never
gradchecked.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from probseg.layers import AmortizedPlanarFlow
from probseg.layers.gaussian import Generators, sample_set
from probseg.models.network import NetworkOutput
from probseg.models.objectives import SinkhornDivergence, sinkhorn_divergence
from probseg.models.punet import ProbUNet, ProbUNetNetwork
from probseg.models.registry import register_model

__all__ = ["CSAENetwork", "ConditionalSinkhornAutoencoder", "rater_slots", "sinkhorn_divergence"]

RECONSTRUCT_FROM = ("base", "flowed")
SINKHORN_POSTERIORS = ("one_rater", "all_raters")


def rater_slots(rater_mask: torch.Tensor, num_slots: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Share ``num_slots`` sample slots per image out over its present raters, round robin from a
    random start: (B, R) bool -> (B, num_slots) rater indices, each present rater getting
    floor(num_slots / R_b) or one more slots, absent raters none.

    Raises:
        ValueError: an image has no present rater.
    """
    count = rater_mask.sum(1)
    if bool((count == 0).any()):
        raise ValueError("every image needs at least one present rater (rater_mask has an all-False row)")
    start = (torch.rand(rater_mask.shape[0], generator=generator, device=rater_mask.device) * count).long()
    rank = (torch.arange(num_slots, device=rater_mask.device)[None] + start[:, None]) % count[:, None]  # (B, N)
    present_first = torch.argsort((~rater_mask).to(torch.uint8), dim=1, stable=True)  # present raters, in order
    return present_first.gather(1, rank)


class CSAENetwork(ProbUNetNetwork):
    """The PU-Net's parts plus planar-flow projector heads on the prior and the posterior, each
    amortized from its own encoder's features.

    Args:
        flow_steps: K planar steps of each head.
        num_ot_samples: N_OT flowed samples per image and distribution.
        reconstruct_from, sinkhorn_posterior, sample_through_prior_flow: see
            :class:`ConditionalSinkhornAutoencoder`.
        (other arguments as in :class:`~probseg.models.punet.ProbUNetNetwork`; ``generator_args``:
        its ``generator`` and ``generator_options``)

    Forward outputs: ``logits``, ``posterior`` and ``prior`` (the base Normals, for the KL),
    ``ot_posterior`` and ``ot_prior`` ((B, N_OT, L) flowed samples, for the Sinkhorn term),
    ``features`` and ``prior_features`` (what this step's prior hypotheses decode:
    :meth:`prior_parts`).
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 latent_dim: int, fcomb_layers: int, flow_steps: int, num_ot_samples: int, reconstruct_from: str,
                 sinkhorn_posterior: str, sample_through_prior_flow: bool, **generator_args: Any) -> None:
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_dim, fcomb_layers,
                         **generator_args)
        self.num_ot_samples = num_ot_samples
        self.reconstruct_from = reconstruct_from
        self.sinkhorn_posterior = sinkhorn_posterior
        self.sample_through_prior_flow = sample_through_prior_flow
        self.prior_flow = AmortizedPlanarFlow(self.prior.feature_dim, latent_dim, flow_steps)
        self.posterior_flow = AmortizedPlanarFlow(self.posterior.feature_dim, latent_dim, flow_steps)

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        images, features, q_features = self.encode(batch, target)
        p_features = self.prior.encode(images)
        posterior = self.posterior.distribution(q_features)
        prior = self.prior.distribution(p_features)
        if self.sinkhorn_posterior == "one_rater":
            # One draw set per distribution: the first posterior sample (base or flowed)
            # reconstructs, all N_OT flowed samples of each side enter the Sinkhorn divergence.
            zq0 = sample_set(posterior, self.num_ot_samples, generator)
            zq, _ = self.posterior_flow(q_features, zq0)
            z_rec = zq[:, 0] if self.reconstruct_from == "flowed" else zq0[:, 0]
        else:
            z0 = sample_set(posterior, 1, generator)
            z_rec = self.posterior_flow(q_features, z0)[0][:, 0] if self.reconstruct_from == "flowed" else z0[:, 0]
            zq = self.aggregate_posterior_samples(batch, generator)
        zp, _ = self.prior_flow(p_features, sample_set(prior, self.num_ot_samples, generator))
        return {"logits": self.fcomb(features, z_rec), "posterior": posterior, "prior": prior,
                "ot_posterior": zq, "ot_prior": zp, "features": features, "prior_features": p_features}

    def aggregate_posterior_samples(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """N_OT flowed samples of each image's aggregate posterior, (B, N_OT, L): slot j of image b
        is a draw of the flowed posterior of rater :func:`rater_slots` [b, j] (present raters only).

        Each rater's posterior is conditioned on that rater's own mask (hard labels, also when
        ``fusion`` gives the reconstruction a soft target).
        """
        images, masks = batch["image"], batch["masks"]
        b, r = masks.shape[:2]
        n = self.num_ot_samples
        rater_mask = batch.get("rater_mask")
        if rater_mask is None:
            rater_mask = torch.ones(b, r, dtype=torch.bool, device=masks.device)
        slots = rater_slots(rater_mask, n, generator)  # (B, N_OT)
        features = self.posterior.features(images.repeat_interleave(r, 0), masks.flatten(0, 1)).unflatten(0, (b, r))
        features = features.gather(1, slots[..., None].expand(b, n, features.shape[-1]))  # (B, N_OT, F): slot's rater
        base = self.posterior.distribution(features.flatten(0, 1)).base_dist
        eps = torch.randn(b, n, base.loc.shape[-1], generator=generator, device=base.loc.device, dtype=base.loc.dtype)
        z0 = base.loc + base.scale * eps.flatten(0, 1)  # (B N_OT, L)
        zq, _ = self.posterior_flow(features.flatten(0, 1), z0)
        return zq.unflatten(0, (b, n))

    def prior_parts(self, images: torch.Tensor) -> NetworkOutput:
        """``features``, ``prior`` and the prior encoder's ``prior_features`` (the prior flow's
        amortization), the keys of the same name in the forward outputs."""
        p_features = self.prior.encode(images)
        return {"features": self.unet(images), "prior": self.prior.distribution(p_features),
                "prior_features": p_features}

    def decode_prior(self, parts: NetworkOutput, num_samples: int, generator: Generators = None) -> torch.Tensor:
        """S hypotheses from base prior draws, or with ``sample_through_prior_flow`` from their
        images under the prior flow, (B, S, K, H, W) logits."""
        if not self.sample_through_prior_flow:
            return super().decode_prior(parts, num_samples, generator)
        z, _ = self.prior_flow(parts["prior_features"], sample_set(parts["prior"], num_samples, generator))
        return self.fcomb(parts["features"], z)


@register_model("csae")
class ConditionalSinkhornAutoencoder(ProbUNet):
    """cSAE (registry name ``"csae"``).

    Args:
        beta: weight of the analytic KL between the base Normals (paper: 10).
        gamma: weight of the Sinkhorn divergence (paper: 1 or 10). Default 1: on the LIDC
            development crops with beta 10, gamma 10 left the base reading's hypotheses nearly
            identical in 2 of 3 seeds (diversity 0.012 and 0.018, 0.093 in the third), gamma 1 in
            1 of 3 (0.052; 0.234 and 0.317 otherwise); ``benchmarks/latent_study.py``, README
            "Models".
        flow_steps: K planar steps of each projector head (paper: 2).
        num_ot_samples: N_OT flowed samples per image and distribution (paper: 16).
        sinkhorn_blur, sinkhorn_diameter, sinkhorn_scaling: GeomLoss settings (paper: p = 2,
            diameter 100, GeomLoss defaults otherwise: blur 0.05, scaling 0.5).
        sample_through_prior_flow: draw test-time hypotheses through the prior flow instead of
            from the base prior (the paper discards the flows; this is for comparison).
        reconstruct_from: ``"base"`` or ``"flowed"`` posterior sample reconstructs in training
            (see the module docstring).
        sinkhorn_posterior: ``"one_rater"`` (N_OT draws of the training target's posterior) or
            ``"all_raters"`` (the image's aggregate posterior over its present raters).
        **kwargs: the arguments of :class:`ProbUNet` (``kl_warmup_steps`` and ``free_bits``
            act on the KL term) and the shared options.

    Loss terms: ``rec_<component>`` (by default ``rec_ce``), ``kl`` (beta-weighted) and
    ``sinkhorn`` (gamma-weighted), batch means; diagnostics as in :class:`ProbUNet`.
    """

    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"reconstruct_from": "flowed", "sinkhorn_posterior": "one_rater"}
    """Hyperparameters a checkpoint written before they existed (release 0.1) did not save: the
    behaviour it was trained with. :func:`probseg.load_model` fills them in."""

    def __init__(
        self,
        *,
        beta: float = 10.0,
        gamma: float = 1.0,
        flow_steps: int = 2,
        num_ot_samples: int = 16,
        sinkhorn_blur: float = 0.05,
        sinkhorn_diameter: float = 100.0,
        sinkhorn_scaling: float = 0.5,
        sample_through_prior_flow: bool = False,
        reconstruct_from: str = "base",
        sinkhorn_posterior: str = "one_rater",
        **kwargs: Any,
    ) -> None:
        sinkhorn = SinkhornDivergence(gamma, sinkhorn_blur, sinkhorn_diameter, sinkhorn_scaling)
        if num_ot_samples < 1:
            raise ValueError(f"num_ot_samples (N_OT) must be at least 1, got {num_ot_samples}")
        if reconstruct_from not in RECONSTRUCT_FROM:
            raise ValueError(f"reconstruct_from must be one of {RECONSTRUCT_FROM}, got {reconstruct_from!r}")
        if sinkhorn_posterior not in SINKHORN_POSTERIORS:
            raise ValueError(f"sinkhorn_posterior must be one of {SINKHORN_POSTERIORS}, got {sinkhorn_posterior!r}")
        super().__init__(beta=beta, **kwargs)
        self.objectives.append(sinkhorn)

    def build_network(self) -> CSAENetwork:
        hp = self.hparams
        return CSAENetwork(self.in_channels, self.num_classes, hp.num_filters, hp.convs_per_block, hp.latent_dim,
                           hp.fcomb_layers, hp.flow_steps, hp.num_ot_samples, hp.reconstruct_from,
                           hp.sinkhorn_posterior, hp.sample_through_prior_flow, **self.generator_arguments())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written before an option existed trains on with the behaviour it was
        trained with (e.g. ``probseg fit --ckpt_path`` on a release-0.1 run), with a warning."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        for key, legacy in self.LEGACY_DEFAULTS.items():
            if key not in saved and getattr(self.network, key) != legacy:
                warnings.warn(
                    f"the checkpoint predates the cSAE option {key!r}: it was trained with {key}={legacy!r}, which "
                    f"is kept instead of {getattr(self.network, key)!r}; to change the reading, start a new run from "
                    "its weights", stacklevel=2,
                )
                setattr(self.network, key, legacy)
                self.hparams[key] = legacy
