"""The bad-input table: wrong inputs to the public API give a clear, specific error (type and
message naming the argument, shape, file or key), never a stack trace from deep inside torch."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import probseg
from probseg.cli import main
from probseg.losses import dml1, mse, soft_cross_entropy, uniform_kl
from probseg.metrics.functional import (
    binarized_dice,
    empirical_wasserstein,
    expected_calibration_error,
    generalized_energy_distance,
    pairwise_cost,
)
from probseg.models import MODELS
from tests.helpers import tiny_config
from tests.models.test_zoo import TINY_ARGS

MODEL = MODELS["punet"](**TINY_ARGS["punet"])
X = torch.rand(2, 1, 32, 32)
M = torch.randint(0, 2, (2, 3, 16, 16))
P = torch.rand(2, 4, 16, 16)

CASES: list[tuple[str, Callable[[], object], type, str]] = [
    # model.sample
    ("sample: wrong channel count", lambda: MODEL.sample(torch.rand(2, 3, 32, 32), 2), ValueError, r"1 image channel\(s\), got 3"),
    ("sample: wrong rank", lambda: MODEL.sample(torch.rand(1, 32, 32), 2), ValueError, r"\(B, C, H, W\)"),
    ("sample: num_samples < 1", lambda: MODEL.sample(X, 0), ValueError, "num_samples must be positive"),
    ("sample: integer images", lambda: MODEL.sample(X.long(), 2), TypeError, "floating-point image"),
    ("sample: size the U-Net cannot take", lambda: MODEL.sample(torch.rand(1, 1, 30, 30), 2), ValueError, "divisible by 4"),
    # metric functionals
    ("metric: batch sizes differ", lambda: pairwise_cost(M[:1].bool(), M.bool()), ValueError, "must share the batch size"),
    ("metric: image sizes differ", lambda: empirical_wasserstein(M.bool(), M[..., :8].bool()), ValueError, r"\(H, W\)"),
    ("metric: sets not (B, N, H, W)", lambda: generalized_energy_distance(M[0].bool(), M.bool()), ValueError, r"\(B, N, H, W\)"),
    ("metric: non-binary masks", lambda: pairwise_cost(M * 2, M), ValueError, "binary masks"),
    ("metric: NaN probabilities (CE kernel)", lambda: pairwise_cost(P.clone().fill_(float("nan")), M[:, :1], "ce"), ValueError, "NaN"),
    ("metric: NaN probabilities (ECE)", lambda: expected_calibration_error(P * float("nan"), M), ValueError, "NaN"),
    ("metric: probabilities above 1 (BDice)", lambda: binarized_dice(P + 1, M), ValueError, r"\[0, 1\]"),
    ("metric: unknown kernel", lambda: pairwise_cost(M.bool(), M.bool(), "jaccard"), ValueError, "unknown kernel"),
    ("metric: rater_mask of another shape", lambda: empirical_wasserstein(M.bool(), M.bool(), rater_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"rater_mask must have shape \(B, R\)"),
    # losses
    ("loss: pred above 1", lambda: dml1(P[:, :2] + 1, P[:, :2]), ValueError, r"pred must lie in \[0, 1\]"),
    ("loss: pred below 0", lambda: soft_cross_entropy(P[:, :2] - 1, P[:, :2]), ValueError, r"\[0, 1\]"),
    ("loss: shape mismatch", lambda: mse(P[:, :2], P[:, :2, :8]), ValueError, "differ in shape"),
    ("loss: K mismatch", lambda: dml1(P[:, :2], P[:, :3]), ValueError, "differ in classes K"),
    ("loss: wrong rank", lambda: uniform_kl(P[0]), ValueError, r"\(B, K, H, W\)"),
    ("loss: unknown reduction", lambda: dml1(P[:, :2], P[:, :2], reduction="avg"), ValueError, "reduction must be one of"),
    # loading
    ("load_model: missing file", lambda: probseg.load_model("/nonexistent/model.ckpt"), FileNotFoundError, "checkpoint not found: /nonexistent/model.ckpt"),
]


@pytest.mark.parametrize(("label", "call", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_public_api_bad_inputs(label: str, call: Callable[[], object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def _yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


CLI_CASES = [
    ("unknown model name", lambda tmp: ["fit", "--model", "pnet"], "unknown model 'pnet'.*Did you mean 'punet'"),
    ("unknown model in YAML", lambda tmp: ["fit", "--config", str(tiny_config(tmp, model="csea"))],
     "unknown model 'csea'.*Did you mean 'csae'"),
    ("unknown model option in YAML",
     lambda tmp: ["fit", "--config", str(_yaml(tmp / "c.yaml", {"model": {"class_path": "punet", "init_args": {"num_filter": [4]}}}))],
     "Option 'num_filter' is not accepted"),
    ("unknown trainer key in YAML",
     lambda tmp: ["fit", "--config", str(_yaml(tmp / "c.yaml", {"model": "punet", "trainer": {"max_step": 1}}))],
     "does not accept option 'trainer.max_step'"),
    ("missing config file", lambda tmp: ["fit", "--config", str(tmp / "absent.yaml")], "absent.yaml"),
    ("missing checkpoint for sample", lambda tmp: ["sample", "--ckpt", str(tmp / "absent.ckpt"), "--input", "x.npy",
                                                   "--out", str(tmp / "o")], "checkpoint not found: .*absent.ckpt"),
    ("missing data config for summary", lambda tmp: ["data", "summary", "--config", str(tmp / "absent.yaml")],
     "data config not found: .*absent.yaml"),
    ("missing results", lambda tmp: ["results", str(tmp / "absent")], "no such file or folder"),
]


@pytest.mark.parametrize(("label", "argv", "match"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_inputs(label: str, argv, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main([*argv(tmp_path), "--wandb", "disabled"] if argv(tmp_path)[0] == "fit" else argv(tmp_path))
    except SystemExit as exit_info:
        code = exit_info.code
    assert code not in (0, None)
    captured = capsys.readouterr()
    assert __import__("re").search(match, captured.err + captured.out, flags=__import__("re").S), captured.err[-2000:]
    assert "Traceback" not in captured.err


def test_the_table_size() -> None:
    """Recorded in the issue note: the number of bad inputs tried."""
    assert len(CASES) + len(CLI_CASES) == 29
