"""The speed benchmarks' peer-style baselines compute what probseg computes (the scripts check it
before timing; here on tiny inputs), and their tables come out whole. Timings themselves are not
tested."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_interleaved_timing_runs_every_function_each_round() -> None:
    timing = load_script(BENCH / "_timing.py")
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                               torch.device("cpu"))
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating order


def test_sampling_peer_loop_draws_from_the_same_model() -> None:
    sampling = load_script(BENCH / "sampling.py")
    rows = sampling.compare_with_peer([4, 8], 1, 16, [2], [3], 1, torch.device("cpu"))
    assert [(b, s) for b, s, *_ in rows] == [(2, 3)]
    torch.manual_seed(0)
    model = sampling.ProbUNet(num_filters=[4, 8], convs_per_block=1).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.inference_mode():
        torch.manual_seed(1)
        peer = sampling.peer_loop_sample(model, x, 3)
        features, prior = model.network.unet(x), model.network.prior(x)
        torch.manual_seed(1)
        z = torch.stack([prior.sample() for _ in range(3)], dim=1)
        torch.testing.assert_close(peer, model.network.fcomb(features, z), rtol=1e-4, atol=1e-5)


def test_training_step_versus_peer_checks_equal_losses() -> None:
    train_step = load_script(BENCH / "train_step.py")
    ((batch, t_ours, t_peer, l_ours, l_peer),) = train_step.versus_peer([2], 16, 1, torch.device("cpu"))
    assert batch == 2 and t_ours > 0 and t_peer > 0
    assert l_ours == pytest.approx(l_peer, rel=1e-4)


def test_convolution_share_is_a_fraction_dominated_by_the_convolutions() -> None:
    """The profile behind the training step's bound: a share in (0, 1), most of a paper-config step
    even on tiny images (the U-Net, prior and posterior are convolutions)."""
    train_step = load_script(BENCH / "train_step.py")
    share = train_step.convolution_share(2, 32, torch.device("cpu"), steps=1)
    assert 0.3 < share < 1


def test_eval_benchmark_baseline_equals_the_engine_on_both_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    eval_metrics = load_script(BENCH / "eval_metrics.py")
    args = argparse.Namespace(batch=2, samples=4, raters=2, size=32, repeats=1, seed=0)
    for name in ("blobs", "large"):
        base, engine = eval_metrics.run_distribution(name, args)  # stops if any value differs by > 1e-5
        assert base > 0 and engine > 0
    out = capsys.readouterr().out
    assert out.count("**all four kernels + GED**") == 2


@pytest.mark.slow
def test_soak_reports_memory_and_step_time_per_interval(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--steps", "8", "--every", "4", "--out",
                           str(tmp_path / "soak"), "--wandb", "disabled", "--max-growth-mib", "1000"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and "PASS" in done.stdout
