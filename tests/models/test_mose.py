"""MoSE: the relaxed transport coupling against brute force, the soft IoU cost against loops, the
gate's KL by hand, weighted and categorical hypotheses, and the options."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from probseg.models import MODELS
from probseg.models.mose import (
    MoSEOptimalTransport,
    expert_counts,
    initial_means,
    relaxed_coupling,
    soft_iou_cost,
)
from probseg.models.objectives import StepContext

TINY = {"num_filters": [4, 8], "convs_per_block": 1, "num_experts": 3, "latent_dim": 2, "samples_per_expert": 2}


def _batch(b: int = 2, r: int = 3, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 1, size, size, generator=g), "masks": torch.randint(0, 2, (b, r, size, size), generator=g),
            "rater_mask": torch.ones(b, r, dtype=torch.bool)}


def brute_force_relaxed_transport(cost: np.ndarray, per_prediction: int) -> float:
    """min <P, C> with M raters of mass 1/M and a cap of per_prediction / M per prediction: the
    problem's data are integers in units of 1/M and its matrix is totally unimodular, so an
    optimal plan sends each rater whole to one prediction; enumerate every such plan."""
    n, m = cost.shape
    best = np.inf
    for choice in itertools.product(range(n), repeat=m):
        if max(np.bincount(choice, minlength=n)) <= per_prediction:
            best = min(best, sum(cost[i, j] for j, i in enumerate(choice)) / m)
    return best


@pytest.mark.parametrize(("n", "m", "per_prediction"), [(4, 4, 2), (3, 4, 2), (5, 3, 1), (2, 4, 2), (6, 4, 4)])
def test_exact_coupling_equals_brute_force(n: int, m: int, per_prediction: int) -> None:
    rng = np.random.default_rng(n * 10 + m)
    for _ in range(5):
        cost = rng.random((n, m))
        plan = relaxed_coupling(cost, np.full(m, 1 / m), per_prediction / m, "exact")
        np.testing.assert_allclose(plan.sum(0), 1 / m, atol=1e-9)
        assert (plan.sum(1) <= per_prediction / m + 1e-9).all() and (plan >= -1e-12).all()
        assert (plan * cost).sum() == pytest.approx(brute_force_relaxed_transport(cost, per_prediction), abs=1e-9)


def test_greedy_coupling_is_optimal_without_a_cap_and_can_miss_with_one() -> None:
    """gamma = 1: each rater goes whole to its cheapest prediction, as the exact plan. With a cap
    the code's greedy fill is a heuristic: here it pays 0.5 against the optimum 0.3."""
    rng = np.random.default_rng(0)
    cost = rng.random((5, 4))
    mass = np.full(4, 0.25)
    for method in ("greedy", "exact"):
        assert (relaxed_coupling(cost, mass, 1.0, method) * cost).sum() == pytest.approx(cost.min(0).mean())
    cost = np.array([[0.0, 0.1], [0.5, 1.0]])
    mass = np.array([0.5, 0.5])
    greedy = (relaxed_coupling(cost, mass, 0.5, "greedy") * cost).sum()
    exact = (relaxed_coupling(cost, mass, 0.5, "exact") * cost).sum()
    assert greedy == pytest.approx(0.5) and exact == pytest.approx(0.3)


def test_soft_iou_cost_matches_loops() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=(2, 4, 5, 5)).transpose(0, 1, 4, 2, 3)  # (B, N, K, H, W)
    masks = rng.integers(0, 3, (2, 2, 5, 5))
    got = soft_iou_cost(torch.as_tensor(probs), torch.as_tensor(masks)).numpy()
    for b, n, m in itertools.product(range(2), range(4), range(2)):
        ious = []
        for c in (1, 2):
            p, y = probs[b, n, c], masks[b, m] == c
            inter = (p * y).sum()
            ious.append((inter + 1) / (p.sum() + y.sum() - inter + 1))
        assert got[b, n, m] == pytest.approx(1 - np.mean(ious), abs=1e-6)


def test_objective_terms_by_hand() -> None:
    """One image, two predictions of weights (0.8, 0.2), two raters: gamma = 1 sends both raters
    to the prediction that fits them; rec_ot = <P, C>, gate_kl = KL(P 1 || w)."""
    masks = torch.tensor([[[[1, 1], [0, 0]], [[1, 1], [0, 0]]]])
    good = torch.tensor([[[-9.0, -9.0], [9.0, 9.0]], [[9.0, 9.0], [-9.0, -9.0]]])
    bad = -good
    logits = torch.stack([good, bad])[None]  # (1, 2, 2, 2, 2)
    weights = torch.tensor([[0.8, 0.2]])
    outputs = {"sample_logits": logits, "sample_weights": weights}
    context = StepContext({"masks": masks}, masks[:, 0], outputs, None, training=True, step=10)
    terms = MoSEOptimalTransport(relaxation=1.0)(context)
    cost = soft_iou_cost(logits.softmax(2), masks)[0]
    assert terms["rec_ot"].item() == pytest.approx(cost[0].mean().item(), abs=1e-6)
    assert terms["gate_kl"].item() == pytest.approx(np.log(1 / 0.8), abs=1e-6)
    mean = MoSEOptimalTransport(relaxation=1.0, gate_kl_reduction="mean", beta=2.0)(context)
    assert mean["gate_kl"].item() == pytest.approx(2 * np.log(1 / 0.8) / 2, abs=1e-6)
    # gamma = 1/2 splits the raters over both predictions until the switch step
    capped = MoSEOptimalTransport(relaxation=0.5, relaxation_steps=11)(context)  # training, step 10
    assert capped.diagnostics["relaxation"].item() == 0.5
    assert capped["rec_ot"].item() == pytest.approx(cost.mean().item(), abs=1e-6)
    switched = MoSEOptimalTransport(relaxation=0.5, relaxation_steps=10)(context)
    assert switched.diagnostics["relaxation"].item() == 1.0


def test_absent_raters_carry_no_mass() -> None:
    torch.manual_seed(0)
    model = MODELS["mose"](**TINY)
    batch = _batch()
    batch["rater_mask"] = torch.tensor([[True, False, True], [True, True, True]])
    batch_two = {**batch, "masks": batch["masks"][:1, [0, 2]], "image": batch["image"][:1],
                 "rater_mask": torch.ones(1, 2, dtype=torch.bool)}
    objective = model.objectives[0]
    out = model.network(batch, batch["masks"][:, 0], torch.Generator().manual_seed(0))
    cost = soft_iou_cost(out["sample_logits"].softmax(2), batch["masks"])
    plan = objective.couplings(cost, batch["rater_mask"], 0.5)
    assert plan[0, :, 1].abs().sum() == 0
    torch.testing.assert_close(plan.sum((1, 2)), torch.ones(2, dtype=plan.dtype))
    alone = objective.couplings(cost[:1, :, [0, 2]], batch_two["rater_mask"], 0.5)
    torch.testing.assert_close(plan[0][:, [0, 2]], alone[0])


def test_weighted_hypotheses_weigh_pi_over_each_experts_draws() -> None:
    torch.manual_seed(0)
    network = MODELS["mose"](**TINY).network.eval()
    images = _batch()["image"]
    with torch.no_grad():
        logits, weights = network.sample_weighted(images, 7, torch.Generator().manual_seed(0))
        _, pi, _, _ = network.encode(images)
    assert logits.shape == (2, 7, 2, 16, 16) and expert_counts(7, 3) == [3, 2, 2]
    expect = torch.cat([pi[:, :1].expand(-1, 3) / 3, pi[:, 1:2].expand(-1, 2) / 2, pi[:, 2:].expand(-1, 2) / 2], 1)
    torch.testing.assert_close(weights, expect)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="at least one hypothesis per expert"):
        expert_counts(2, 3)
    with torch.no_grad():  # fewer draws than experts: categorical draws of equal weight
        few, uniform = network.sample_weighted(images, 2, torch.Generator().manual_seed(0))
        expect = network.sample(images, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(few, expect)
    torch.testing.assert_close(uniform, torch.full((2, 2), 0.5))


def test_categorical_hypotheses_follow_the_gate() -> None:
    """sample() draws each hypothesis's expert from pi: with sigma ~ 0 each draw decodes one of
    the K expert means, and the frequencies match pi within 5 standard errors."""
    torch.manual_seed(0)
    network = MODELS["mose"](**{**TINY, "latent_dim": 1}).network.eval()
    with torch.no_grad():
        network.expert_log_sigma.fill_(-9.0)
        network.expert_mu.copy_(torch.tensor([[-3.0], [0.0], [3.0]]))
        images = _batch(1)["image"]
        n = 3000
        draws = network.sample(images, n, torch.Generator().manual_seed(0))[0]
        means = network.decode(network.encode(images)[0], network.expert_mu[None, :, :])[0]
        _, pi, _, _ = network.encode(images)
    nearest = torch.cdist(draws.flatten(1), means.flatten(1)).argmin(1)
    freq = torch.bincount(nearest, minlength=3).double() / n
    p = pi[0].double()
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all())


def test_initial_means_start_at_the_corners() -> None:
    means = initial_means(5, 2, torch.Generator().manual_seed(0))
    assert means[:4].tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert ((means[4] >= 0) & (means[4] < 1)).all()


def test_the_gate_learns_from_the_kl_only_and_the_experts_from_the_transport() -> None:
    torch.manual_seed(0)
    model = MODELS["mose"](**TINY)
    terms = model.loss_terms(_batch(), torch.Generator().manual_seed(0))
    terms["gate_kl"].backward(retain_graph=True)
    gate_grad = [p.grad.abs().sum() for p in model.network.gate.parameters()]
    assert all(g > 0 for g in gate_grad) and model.network.expert_mu.grad is None
    model.zero_grad()
    terms["rec_ot"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.network.gate.parameters())
    assert model.network.expert_mu.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fusion": "mean"}, "fusion does not apply"),
        ({"fusion_options": {"recipe": "paper"}}, "fusion_options does not apply to MoSE"),
        ({"reconstruction": {"ce": 1.0}}, "reconstruction does not apply"),
        ({"coupling": "sinkhorn"}, "coupling"),
        ({"relaxation": 0.0}, "relaxation"),
        ({"experts": "shared"}, "experts"),
        ({"gate_kl_reduction": "batchmean"}, "gate_kl_reduction"),
    ],
)
def test_bad_mose_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MODELS["mose"](**{**TINY, **kwargs})


def test_a_cap_too_small_for_the_predictions_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        MODELS["mose"](**{**TINY, "relaxation": 0.1})  # 6 predictions x 0.1 < 1
    with pytest.raises(ValueError, match="cannot carry"):
        MoSEOptimalTransport(relaxation=0.1).couplings(torch.rand(1, 6, 2), torch.ones(1, 2, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        relaxed_coupling(np.ones((2, 2)), np.full(2, 0.5), 1.0, "gredy")


def test_validation_uses_the_unrelaxed_cap() -> None:
    objective = MoSEOptimalTransport(relaxation=0.5, relaxation_steps=100)
    assert objective.cap(0, training=True) == 0.5 and objective.cap(0, training=False) == 1.0
    assert objective.cap(100, training=True) == 1.0


def test_mose_samples_with_half_precision_weights() -> None:
    torch.manual_seed(0)
    network = MODELS["mose"](**TINY).network.to(torch.bfloat16).eval()
    with torch.no_grad():
        logits, weights = network.sample_weighted(torch.rand(1, 1, 16, 16, dtype=torch.bfloat16), 6)
    assert logits.dtype == torch.bfloat16 and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(1))


def test_the_assignment_path_equals_the_linear_program() -> None:
    """A cap of c / M with uniform raters takes the Hungarian path; it agrees with the linear
    program and with brute force."""
    rng = np.random.default_rng(7)
    for n, m, c in [(4, 4, 2), (5, 3, 1), (3, 4, 3)]:
        cost = rng.random((n, m))
        fast = relaxed_coupling(cost, np.full(m, 1 / m), c / m)
        lp = relaxed_coupling(cost, np.full(m, 1 / m), c / m, "lp")
        assert (fast * cost).sum() == pytest.approx((lp * cost).sum(), abs=1e-8)
        assert (fast * cost).sum() == pytest.approx(brute_force_relaxed_transport(cost, c), abs=1e-12)
