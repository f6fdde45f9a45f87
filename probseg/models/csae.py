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
from probseg.models.base import LossTerms
from probseg.models.punet import ProbUNet
from probseg.models.registry import register_model

RECONSTRUCT_FROM = ("base", "flowed")
SINKHORN_POSTERIORS = ("one_rater", "all_raters")


def sinkhorn_divergence(
    x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, diameter: float | None = 100.0, scaling: float = 0.5
) -> torch.Tensor:
    """Per-image Sinkhorn divergence S_eps between point clouds, GeomLoss with p = 2.

    GeomLoss's p = 2 ground cost is |x - y|^2 / 2, so for a small blur S approaches half the squared
    2-Wasserstein distance. Computed in float32 whatever the input precision.

    Args:
        x, y: (B, N, L) and (B, M, L) point clouds, uniform weights; image b of x is only compared
            with image b of y.
        blur, diameter, scaling: GeomLoss's ``SamplesLoss`` settings (eps = blur ** p).

    Returns:
        (B,) divergences.
    """
    from geomloss import SamplesLoss

    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"expected point clouds (B, N, L) and (B, M, L), got {tuple(x.shape)} and {tuple(y.shape)}")
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, diameter=diameter, scaling=scaling, backend="tensorized")
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under mixed precision too
        return loss(x.float(), y.float())


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
        reconstruct_from: ``"base"`` or ``"flowed"`` posterior sample reconstructs in training
            (see the module docstring).
        sinkhorn_posterior: ``"one_rater"`` (N_OT draws of the training target's posterior) or
            ``"all_raters"`` (the image's aggregate posterior over its present raters).
        sample_through_prior_flow: draw test-time hypotheses through the prior flow instead of
            from the base prior (the paper discards the flows; this is for comparison).
        kl_warmup_steps, free_bits: posterior-collapse remedies on the KL term, as in
            :class:`ProbUNet`.
        (other arguments, including ``teacher`` and ``distillation``, as in :class:`ProbUNet`)

    Loss terms: ``rec_<component>`` (by default ``rec_ce``), ``kl`` (beta-weighted) and
    ``sinkhorn`` (gamma-weighted), batch means; diagnostics as in :class:`ProbUNet`.
    """

    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"reconstruct_from": "flowed", "sinkhorn_posterior": "one_rater"}
    """Hyperparameters a checkpoint written before they existed (release 0.1) did not save: the
    behaviour it was trained with. :func:`probseg.load_model` fills them in."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006
        convs_per_block: int = 3,
        latent_dim: int = 6,
        fcomb_layers: int = 4,
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
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        fusion: str = "random",
        label_smoothing: float = 0.1,
        reconstruction: dict[str, float] | None = None,
        loss_options: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        num_predict_samples: int = 16,
        teacher: str | None = None,
        distillation: dict[str, Any] | None = None,
    ) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be non-negative, got {gamma}")
        if num_ot_samples < 1:
            raise ValueError(f"num_ot_samples (N_OT) must be at least 1, got {num_ot_samples}")
        if sinkhorn_blur <= 0 or not 0 < sinkhorn_scaling < 1:
            raise ValueError(
                f"sinkhorn_blur must be positive and sinkhorn_scaling in (0, 1), got {sinkhorn_blur} and {sinkhorn_scaling}"
            )
        if reconstruct_from not in RECONSTRUCT_FROM:
            raise ValueError(f"reconstruct_from must be one of {RECONSTRUCT_FROM}, got {reconstruct_from!r}")
        if sinkhorn_posterior not in SINKHORN_POSTERIORS:
            raise ValueError(f"sinkhorn_posterior must be one of {SINKHORN_POSTERIORS}, got {sinkhorn_posterior!r}")
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_dim, fcomb_layers, beta,
                         kl_warmup_steps=kl_warmup_steps, free_bits=free_bits,
                         fusion=fusion, label_smoothing=label_smoothing,
                         reconstruction=reconstruction, loss_options=loss_options, teacher=teacher,
                         distillation=distillation, lr=lr, weight_decay=weight_decay,
                         num_predict_samples=num_predict_samples)
        self.save_hyperparameters()
        self.gamma = gamma
        self.num_ot_samples = num_ot_samples
        self.sample_through_prior_flow = sample_through_prior_flow
        self.reconstruct_from = reconstruct_from
        self.sinkhorn_posterior = sinkhorn_posterior
        self.prior_flow = AmortizedPlanarFlow(self.prior.feature_dim, latent_dim, flow_steps)
        self.posterior_flow = AmortizedPlanarFlow(self.posterior.feature_dim, latent_dim, flow_steps)

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossTerms:
        hp = self.hparams
        images, target, features, q_features = self.encode_batch(batch, generator)
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
        logits = self.fcomb(features, z_rec)
        sinkhorn = sinkhorn_divergence(zq, zp, hp.sinkhorn_blur, hp.sinkhorn_diameter, hp.sinkhorn_scaling)
        kl = self.kl_terms(self.kl(posterior, prior), self.kl_per_dim(posterior, prior))
        return self.combine_terms(self.reconstruction_terms(logits, target), kl, sinkhorn=self.gamma * sinkhorn.mean())

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written before an option existed trains on with the behaviour it was
        trained with (e.g. ``probseg fit --ckpt_path`` on a release-0.1 run), with a warning."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        for key, legacy in self.LEGACY_DEFAULTS.items():
            if key not in saved and getattr(self, key) != legacy:
                warnings.warn(
                    f"the checkpoint predates the cSAE option {key!r}: it was trained with {key}={legacy!r}, which "
                    f"is kept instead of {getattr(self, key)!r}; to change the reading, start a new run from "
                    "its weights", stacklevel=2,
                )
                setattr(self, key, legacy)
                self.hparams[key] = legacy

    def sample(
        self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None
    ) -> torch.Tensor:
        if not self.sample_through_prior_flow:
            return super().sample(images, num_samples, generator)
        features = self.unet(images)
        p_features = self.prior.encode(images)
        z, _ = self.prior_flow(p_features, sample_set(self.prior.distribution(p_features), num_samples, generator))
        return self.fcomb(features, z)
