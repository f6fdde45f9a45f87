"""The real ``probseg`` CLI: console script, fit -> test, registry names, predict, W&B offline."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import probseg
from probseg.cli import main, resolve_model_names
from probseg.models import ProbUNet
from tests.helpers import tiny_config

PROBSEG = [sys.executable, "-m", "probseg.cli"]


def _metric_keys(root: Path) -> set[str]:
    (metrics,) = sorted(root.glob("run/logs/version_*/metrics.csv"))[-1:]
    with open(metrics, newline="") as f:
        return {k for row in csv.DictReader(f) for k, v in row.items() if v}


def test_help_lists_commands_without_lightning() -> None:
    code = "import sys; from probseg.cli import main; main(['--help']); print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("fit", "validate", "test", "predict", "sample", "models"):
        assert command in out
    assert out.strip().endswith("False"), "probseg --help must not import Lightning"


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_fit_then_test_through_console_script(tmp_path: Path) -> None:
    """Drive the installed CLI as a user would: fit with W&B offline (the default), then test."""
    config = tiny_config(tmp_path)
    fit = subprocess.run([*PROBSEG, "fit", "--config", str(config)], capture_output=True, text=True, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert "last checkpoint" in fit.stdout and str(last) in fit.stdout
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "W&B should log offline by default"
    assert list((tmp_path / "run" / "logs").glob("version_*/loss_curves.png"))
    model = probseg.load_model(last)
    assert type(model) is ProbUNet and not model.training
    assert model.sample(torch.rand(2, 1, 32, 32), 3).shape == (2, 3, 2, 32, 32)
    keys = _metric_keys(tmp_path)
    assert {"train/loss", "train/rec", "train/kl", "val/loss", "val/rec", "val/kl"} <= keys

    test = subprocess.run(
        [*PROBSEG, "test", "--config", str(config), "--ckpt_path", str(last), "--wandb", "disabled"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/loss" in test.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "punet"],
        ["--model=punet"],
        ["--model.class_path", "punet"],
    ],
)
def test_registry_name_on_command_line(args: list[str], tmp_path: Path) -> None:
    resolved = resolve_model_names(["fit", *args], tmp_path)
    assert resolved[-1] == "probseg.models.punet.ProbUNet"


@pytest.mark.parametrize("model", ["punet", "ProbUNet", "probseg.models.punet.ProbUNet", "probseg.models.ProbUNet"])
def test_model_chosen_in_yaml(model: str, tmp_path: Path) -> None:
    from probseg.cli import build_cli

    config = tiny_config(tmp_path, model=model)
    cli = build_cli(resolve_model_names(["--config", str(config), "--wandb", "disabled"], tmp_path), run=False)
    assert type(cli.model) is ProbUNet
    assert cli.model.hparams.num_filters == [4, 8, 8]


def test_model_given_as_bare_registry_name(tmp_path: Path) -> None:
    from probseg.cli import build_cli

    config = tiny_config(tmp_path, model="punet")
    text = config.read_text().replace("class_path: punet\n", "")
    config.write_text(text.replace("model:\n  init_args:", "model_args:") + "model: punet\n")
    cli = build_cli(resolve_model_names(["--config", str(config), "--wandb", "disabled"], tmp_path), run=False)
    assert type(cli.model) is ProbUNet


def test_unknown_model_name_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, model="no_such_model")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--wandb", "disabled"])
    assert exit_info.value.code != 0
    assert "no_such_model" in capsys.readouterr().err


def test_validate_logs_val_terms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    assert main(["validate", "--config", str(config), "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    for key in ("val/loss", "val/rec", "val/kl"):
        assert key in out


def test_predict_returns_hypotheses(tmp_path: Path) -> None:
    from probseg.cli import build_cli

    config = tiny_config(tmp_path, max_steps=1)
    args = ["--config", str(config), "--wandb", "disabled", "--model.init_args.num_predict_samples", "5"]
    cli = build_cli(resolve_model_names(args, tmp_path), run=False)
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert len(predictions) == 1  # 8 test images, batch size 8
    assert predictions[0]["samples"].shape == (8, 5, 2, 32, 32)
    assert len(predictions[0]["id"]) == 8
    assert torch.isfinite(predictions[0]["samples"]).all()
