"""PHiSeg and HPU-Net: the hierarchical KL against a hand computation, the residual logits, the
per-level reconstruction, the top-k cross-entropy's draws, and the latent levels' shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probseg.layers.hierarchical import HierarchicalLatents, spatial_normal
from probseg.models import MODELS
from probseg.models.hpunet import pixel_cross_entropy, top_k_mask
from probseg.models.objectives import HierarchicalKL, StepContext
from probseg.models.phiseg import level_weights

PHISEG = {"num_filters": [4, 8, 8], "convs_per_block": 1, "latent_levels": 2}
HPUNET = {"num_filters": [4, 8, 8], "convs_per_block": 1, "latent_levels": 2}


def _batch(b: int = 2, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 1, size, size, generator=g), "masks": torch.randint(0, 2, (b, 3, size, size), generator=g),
            "rater_mask": torch.ones(b, 3, dtype=torch.bool)}


def _normal_kl(mq: np.ndarray, sq: np.ndarray, mp: np.ndarray, sp: np.ndarray) -> float:
    return float(0.5 * np.sum((sq**2 + (mq - mp) ** 2) / sp**2 + np.log(sp**2) - np.log(sq**2) - 1))


@pytest.mark.parametrize("kind", ["exponential", "uniform"])
def test_hierarchical_kl_matches_a_hand_computation(kind: str) -> None:
    """Three levels (coarse to fine: 1x1, 2x2, 4x4 maps, 2 channels), two images: beta sum_l w_l
    mean_b KL_l with w_l = 4^l from the finest level, each KL the closed form summed over the map."""
    rng = np.random.default_rng(0)
    shapes = [(2, 2, 1, 1), (2, 2, 2, 2), (2, 2, 4, 4)]
    params = [[rng.normal(size=s), rng.uniform(0.3, 2, s), rng.normal(size=s), rng.uniform(0.3, 2, s)] for s in shapes]
    posteriors = [spatial_normal(torch.tensor(mq), torch.tensor(sq)) for mq, sq, _, _ in params]
    priors = [spatial_normal(torch.tensor(mp), torch.tensor(sp)) for _, _, mp, sp in params]
    weights = level_weights(kind, 3)
    assert weights == ([1.0, 4.0, 16.0] if kind == "exponential" else [1.0] * 3)
    objective = HierarchicalKL(weights, beta=0.5)
    context = StepContext({}, torch.zeros(1), {"posteriors": posteriors, "priors": priors}, None)
    terms = objective(context)
    per_level = [np.mean([_normal_kl(*(p[b] for p in level)) for b in range(2)]) for level in params]  # coarse to fine
    fine_first = per_level[::-1]
    expect = 0.5 * sum(w * kl for w, kl in zip(weights, fine_first))
    assert terms["kl"].item() == pytest.approx(expect, rel=1e-10)
    for level, kl in enumerate(fine_first):
        assert terms.diagnostics[f"kl_level{level}"].item() == pytest.approx(kl, rel=1e-10)
    entries = [2 * 4 * 4, 2 * 2 * 2, 2 * 1 * 1]  # latent entries per level, finest first
    floored = HierarchicalKL(weights, beta=0.5, free_bits=1e3)(context)["kl"]
    assert floored.item() == pytest.approx(0.5 * 1e3 * sum(w * n for w, n in zip(weights, entries)))


def test_latent_levels_sit_at_the_coarsest_resolutions() -> None:
    layer = HierarchicalLatents(1, [4, 8, 8, 8], 1, latent_levels=3, latent_dim=2, carry_state=False,
                                sigma_activation="softplus")
    distributions, latents, state = layer(torch.rand(2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert [tuple(z.shape) for z in latents] == [(2, 2, 4, 4), (2, 2, 8, 8), (2, 2, 16, 16)]
    assert state is None and all(d.event_shape == z.shape[1:] for d, z in zip(distributions, latents))
    with pytest.raises(ValueError, match="latent_levels"):
        HierarchicalLatents(1, [4, 8], 1, latent_levels=3, latent_dim=2, carry_state=False, sigma_activation="exp")
    with pytest.raises(ValueError, match="sigma_activation"):
        HierarchicalLatents(1, [4, 8], 1, latent_levels=1, latent_dim=2, carry_state=False, sigma_activation="relu")


def test_the_prior_conditions_on_the_given_latents_only_below_the_top() -> None:
    """Changing the given coarse latent changes the finer levels' prior, not the top level's."""
    torch.manual_seed(0)
    layer = HierarchicalLatents(1, [4, 8, 8], 1, 2, 2, carry_state=True, sigma_activation="exp")
    x = torch.rand(1, 1, 16, 16)
    given = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 8, 8)]
    a, _, _ = layer(x, given=given)
    b, _, _ = layer(x, given=[given[0] + 3, given[1]])
    torch.testing.assert_close(a[0].base_dist.loc, b[0].base_dist.loc, rtol=0, atol=0)
    assert not torch.allclose(a[1].base_dist.loc, b[1].base_dist.loc)


def test_phiseg_logits_are_the_sum_of_the_residuals_and_each_level_is_supervised() -> None:
    """The final logits are the finest accumulation; rec_level<l> is the pixel-summed CE of the
    l-th coarser accumulation (recomputed here with F.cross_entropy), and the terms sum up."""
    torch.manual_seed(0)
    model = MODELS["phiseg"](**PHISEG)
    batch = _batch()
    terms = model.loss_terms(batch, torch.Generator().manual_seed(1))
    # same draws: the target draw, then the posterior draws, from the same generator
    g = torch.Generator().manual_seed(1)
    target = model.training_target(batch, g)
    out = model.network(batch, target, g)
    assert len(out["level_logits"]) == 1
    for name, logits in [("rec_ce", out["logits"]), ("rec_level1", out["level_logits"][0])]:
        ce = F.cross_entropy(logits, target.long(), reduction="none").sum((1, 2)).mean()
        torch.testing.assert_close(terms[name], ce, rtol=1e-5, atol=1e-4)
    # the finest accumulation minus the coarser one is the finest level's residual: full resolution detail
    residual = out["logits"] - out["level_logits"][0]
    assert residual.shape == (2, 2, 16, 16)
    no_supervision = MODELS["phiseg"](**PHISEG, deep_supervision=False).loss_terms(batch)
    assert "rec_level1" not in no_supervision and "rec_ce" in no_supervision


def test_phiseg_hypotheses_do_not_depend_on_the_batch() -> None:
    """One generator per image: image b's hypotheses are the same alone or in a batch."""
    for name, args in (("phiseg", PHISEG), ("hpunet", HPUNET)):
        torch.manual_seed(0)
        model = MODELS[name](**args).eval()
        images = _batch(3)["image"]
        with torch.no_grad():
            together = model.sample(images, 4, [torch.Generator().manual_seed(i) for i in range(3)])
            alone = model.sample(images[1:2], 4, [torch.Generator().manual_seed(1)])
        torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(together[1, 0], together[1, 1]), "hypotheses of one image must differ"


def test_per_level_sigmas_cover_each_latent_map() -> None:
    torch.manual_seed(0)
    model = MODELS["phiseg"](num_filters=[4, 8, 8, 8], convs_per_block=1, latent_levels=3)
    images = _batch(size=32)["image"]
    per_level = model.network.prior_sigmas_per_level(images)
    assert {k: tuple(v.shape) for k, v in per_level.items()} == {"level0": (2, 2 * 16 * 16), "level1": (2, 2 * 8 * 8),
                                                               "level2": (2, 2 * 4 * 4)}
    whole = model.prior_sigmas(images)
    assert whole.shape == (2, sum(v.shape[1] for v in per_level.values())) and bool((whole > 0).all())


def test_top_k_deterministic_keeps_the_largest_cross_entropies() -> None:
    ce = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = top_k_mask(ce, 0.25, deterministic=True)
    k = 8
    assert mask.sum().item() == k
    assert set(np.flatnonzero(mask.numpy())) == set(np.argsort(-ce.numpy().ravel())[:k])


def test_stochastic_top_1_draws_pixels_in_proportion_to_their_cross_entropy() -> None:
    """Gumbel top-1 picks pixel i with probability ce_i / sum ce: frequencies over 20000 draws
    within 5 standard errors."""
    ce = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = sum(top_k_mask(ce, 0.25, g).flatten() for _ in range(n)).numpy()
    p = (ce / ce.sum()).flatten().numpy()
    assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n))


def test_hpunet_top_k_term_is_the_selected_pixels_cross_entropy() -> None:
    """With top_k = 1 every pixel is kept: rec_topk equals the pixel-summed CE of the task."""
    torch.manual_seed(0)
    batch = _batch()
    full = MODELS["hpunet"](**HPUNET, top_k=1.0, geco=False).loss_terms(batch, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    plain = MODELS["hpunet"](**HPUNET, top_k=0, geco=False).loss_terms(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(full["rec_topk"], plain["rec_ce"], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(full["kl"], plain["kl"])
    logits = torch.randn(1, 2, 2, 2)
    soft = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]], [[0.0, 1.0], [0.5, 1.0]]]])
    expect = -(soft * logits.log_softmax(1)).sum(1)
    torch.testing.assert_close(pixel_cross_entropy(logits, soft), expect)
    assert math.isclose(float(pixel_cross_entropy(logits, soft.argmax(1)).sum()),
                        float(F.cross_entropy(logits, soft.argmax(1), reduction="sum")), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("phiseg", {"kl_weighting": "linear"}, "kl_weighting"),
        ("phiseg", {"latent_levels": 4}, "latent_levels"),
        ("hpunet", {"top_k": 1.5}, "top_k"),
        ("hpunet", {"reconstruction": {"ce": 1.0, "dml1": 1.0}}, "top_k replaces"),
        ("hpunet", {"top_k": 0}, "geco constrains"),
        ("hpunet", {"geco_rate": 0.0}, "geco_rate"),
    ],
)
def test_bad_hierarchical_configuration(name: str, kwargs: dict, match: str) -> None:
    base = PHISEG if name == "phiseg" else HPUNET
    with pytest.raises(ValueError, match=match):
        MODELS[name](**{**base, **kwargs})


def test_geco_value_is_lambda_times_the_averaged_constraint_and_its_gradient_the_current_one() -> None:
    """Deterministic top-k: step 1 equals the plain top-k sum minus kappa k (lambda 1, the average
    starts at the value, same gradients); at step 2 the value is lambda_2 (0.99 C_1 + 0.01 C_2)
    with lambda_2 = exp(rate C_1 / k), and the gradient is lambda_2 times the plain one's."""
    torch.manual_seed(0)
    kw = {**HPUNET, "deterministic_top_k": True, "geco_kappa": 0.1, "geco_rate": 0.5}
    geco = MODELS["hpunet"](**kw).train()
    torch.manual_seed(0)
    plain = MODELS["hpunet"](**{**kw, "geco": False}).train()
    batch = _batch()
    k = 2 * 16 * 16 // 50  # floor(0.02 B H W) pixels over the batch of 2: 10, 5 per image on average
    values = []
    for step in range(2):
        g_terms = geco.loss_terms(batch, torch.Generator().manual_seed(step))
        p_terms = plain.loss_terms(batch, torch.Generator().manual_seed(step))
        constraint = p_terms["rec_topk"].detach() - 0.1 * k / 2
        values.append(constraint)
        if step == 0:
            expect, multiplier = constraint, 1.0
        else:
            multiplier = math.exp(0.5 * values[0].item() / (k / 2))
            expect = multiplier * (0.99 * values[0] + 0.01 * constraint)
        assert g_terms.diagnostics["geco_lambda"].item() == pytest.approx(multiplier, rel=1e-5)
        assert g_terms["rec_topk"].item() == pytest.approx(expect.item(), rel=1e-4)
        geco.zero_grad(), plain.zero_grad()
        g_terms["rec_topk"].backward()
        p_terms["rec_topk"].backward()
        for a, b in zip(geco.network.parameters(), plain.network.parameters()):
            if b.grad is not None:
                torch.testing.assert_close(a.grad, multiplier * b.grad, rtol=1e-4, atol=1e-6)


def test_geco_lambda_falls_once_the_constraint_is_met_and_is_checkpointed() -> None:
    torch.manual_seed(0)
    model = MODELS["hpunet"](**HPUNET, geco_kappa=100.0).train()  # every CE is below 100 nats
    for step in range(3):
        model.loss_terms(_batch(), torch.Generator().manual_seed(step))
    state = model.geco_state
    assert state.multiplier.item() < 1 and bool(state.started)
    fresh = MODELS["hpunet"](**HPUNET, geco_kappa=100.0)
    fresh.load_state_dict(model.state_dict())
    assert fresh.geco_state.multiplier.item() == state.multiplier.item()
    assert fresh.objectives[0].state is fresh.geco_state  # the objective reads the loaded buffers
    # a cast replaces buffer tensors: the objective still reads the task's, kept in float32
    fresh.to(torch.bfloat16)
    assert fresh.geco_state.multiplier.dtype == torch.float32 and fresh.network.head.weight.dtype == torch.bfloat16
    fresh.double()
    assert fresh.geco_state.multiplier.dtype == torch.float32
    fresh.float().train().loss_terms(_batch(), torch.Generator().manual_seed(5))
    assert fresh.geco_state.multiplier.item() < state.multiplier.item(), "the cast model keeps updating lambda"
    before = state.multiplier.item()
    evaluation = model.eval().loss_terms(_batch(), torch.Generator().manual_seed(0))
    assert state.multiplier.item() == before, "validation must not update lambda"
    torch.manual_seed(0)
    plain = MODELS["hpunet"](**HPUNET, geco=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("geco_state")})
    expect = plain.eval().loss_terms(_batch(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(evaluation["rec_topk"], expect["rec_topk"]), "validation: the plain top-k CE"


def test_a_non_finite_constraint_leaves_the_geco_state_as_it_was() -> None:
    from probseg.models.hpunet import GECO, GECOState
    from probseg.models.objectives import StepContext

    state = GECOState()
    objective = GECO(0.5, True, 0.05, 0.1, state)
    logits = torch.full((1, 2, 2, 2), float("nan"))
    context = StepContext({}, torch.zeros(1, 2, 2, dtype=torch.long), {"logits": logits}, None, training=True)
    objective(context)
    assert state.multiplier.item() == 1.0 and state.average.item() == 0.0 and not bool(state.started)


def test_phiseg_accumulations_and_kl_levels_are_ordered_finest_first() -> None:
    """Three latent levels: logits = s_0 + s_1 + s_2 and level_logits = [s_1 + s_2, s_2] (level 0
    the finest), rebuilt from the likelihood's residuals of the posterior's draws; kl_level0 is the
    KL of the largest latent map and carries weight 4^0 = 1."""
    from torch.distributions import kl_divergence

    torch.manual_seed(0)
    model = MODELS["phiseg"](num_filters=[4, 8, 8, 8], convs_per_block=1, latent_levels=3)
    network = model.network
    batch = _batch(size=32)
    target = batch["masks"][:, 0]
    out = network(batch, target, torch.Generator().manual_seed(4))
    mask = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() - 0.5
    _, z_q, _ = network.posterior(torch.cat([batch["image"], mask], 1), generator=torch.Generator().manual_seed(4))
    s2, s1, s0 = network.likelihood(z_q, (32, 32))  # coarse to fine
    torch.testing.assert_close(out["logits"], s0 + s1 + s2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["level_logits"][0], s1 + s2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["level_logits"][1], s2, rtol=1e-5, atol=1e-5)
    finest = max(range(3), key=lambda i: out["posteriors"][i].event_shape.numel())
    assert out["posteriors"][finest].event_shape == (2, 16, 16)
    kl_finest = kl_divergence(out["posteriors"][finest], out["priors"][finest]).mean()
    terms = model.objectives[-1](type("C", (), {"outputs": out, "step": 0, "training": False})())
    assert terms.diagnostics["kl_level0"].item() == pytest.approx(kl_finest.item(), rel=1e-6)
    coarse = [kl_divergence(q, p).mean() for q, p in zip(out["posteriors"], out["priors"])]  # 4x4, 8x8, 16x16
    assert terms["kl"].item() == pytest.approx((16 * coarse[0] + 4 * coarse[1] + coarse[2]).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["phiseg", "hpunet"])
def test_the_posterior_path_carries_the_target(name: str) -> None:
    """Images without information and beta = 0: only the posterior's latents know which half of
    the image the rater marked, so the reconstruction falls far only if the latents reach the
    logits (a broken conditioning path stays at the cross-entropy of a coin flip)."""
    torch.manual_seed(0)
    args = {"num_filters": [8, 16, 16], "convs_per_block": 1, "latent_levels": 2, "beta": 0.0, "lr": 3e-3}
    model = MODELS[name](**args, **({"top_k": 0, "geco": False} if name == "hpunet" else {}))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    masks = torch.zeros(8, 1, 16, 16, dtype=torch.long)
    masks[1::2, 0, :8] = 1
    masks[0::2, 0, :, :8] = 1
    batch = {"image": torch.zeros(8, 1, 16, 16), "masks": masks, "rater_mask": torch.ones(8, 1, dtype=torch.bool)}
    coin = 16 * 16 * math.log(2)  # the CE per image of predicting 0.5 everywhere
    for step in range(60):
        terms = model.loss_terms(batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    assert terms["rec_ce"].item() < 0.1 * coin, terms["rec_ce"].item()
