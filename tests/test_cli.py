"""The real ``probseg`` CLI: console script, fit -> test, registry names, predict, W&B offline."""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import probseg
from probseg.cli import build_cli, main, resolve_model_names
from probseg.metrics import METRIC_NAMES
from probseg.models import MODELS, ProbUNet
from probseg.results import read_results
from tests.conftest import TINY_PUNET
from tests.helpers import tiny_config

# The console script installed next to this interpreter (what `probseg` runs in the venv).
PROBSEG = [str(Path(sys.executable).parent / "probseg")]


def _metric_keys(root: Path) -> set[str]:
    (metrics,) = sorted(root.glob("run/logs/version_*/metrics.csv"))[-1:]
    with open(metrics, newline="") as f:
        return {k for row in csv.DictReader(f) for k, v in row.items() if v}


def _cli(args: list[str]) -> Any:
    """Build (without running) the CLI as ``probseg`` would."""
    return build_cli(resolve_model_names(args), run=False)


def test_help_lists_commands_without_lightning() -> None:
    code = "import sys; from probseg.cli import main; main(['--help']); print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("fit", "validate", "test", "predict", "sample", "models"):
        assert command in out
    assert out.strip().endswith("False"), "probseg --help must not import Lightning"


def test_version_and_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert probseg.__version__ in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "punet" in capsys.readouterr().out and "probseg.models.punet.ProbUNet"


def test_python_dash_m_probseg() -> None:
    out = subprocess.run([sys.executable, "-m", "probseg", "models"], capture_output=True, text=True, check=True)
    assert "punet" in out.stdout


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
    assert "LightningCLI's args parameter" not in fit.stderr
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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_checkpoints_reloads_and_samples_through_the_cli(name: str, tmp_path: Path) -> None:
    from tests.models.test_zoo import TINY_ARGS

    config = tiny_config(tmp_path, model={"class_path": name, "init_args": TINY_ARGS[name]}, max_steps=2)
    assert main(["fit", "--config", str(config), "--wandb", "disabled"]) == 0
    model = probseg.load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert type(model) is MODELS[name]
    assert model.sample(torch.rand(3, 1, 32, 32), 4).shape == (3, 4, 2, 32, 32)
    keys = _metric_keys(tmp_path)
    latent = name not in ("unet", "ssn", "mose")  # a KL term; the U-Net has no prior (no Gini), the SSN a factor
    gini = name != "unet"  # the SSN's Gini is over its low-rank factor's singular values, MoSE's over its experts'
    assert {"train/loss", "train/rec", "val/loss"} | ({"train/kl"} if latent else set()) <= keys
    if name == "csae":
        assert {"train/sinkhorn", "val/sinkhorn"} <= keys
    if name == "ssn":
        assert {"train/rec_ssn", "val/rec_ssn"} <= keys and not {"train/kl", "train/rec_ce"} & keys
    if name in ("phiseg", "hpunet"):  # one KL and one Gini curve per latent level
        assert {"train/kl_level0", "train/kl_level1", "train/gini_level0", "train/gini_level1"} <= keys
    if name == "phiseg":
        assert {"train/rec_ce", "train/rec_level1"} <= keys
    if name == "hpunet":
        assert "train/rec_topk" in keys and "train/rec_ce" not in keys
    if name == "mose":
        assert {"train/rec_ot", "train/gate_kl", "val/rec_ot"} <= keys and "train/kl" not in keys
    # The default evaluation and Gini callbacks run for every zoo model.
    metrics = [m for m in METRIC_NAMES if gini or m != "gini"]
    assert {f"val/{m}" for m in metrics} | ({"train/gini"} if gini else set()) <= keys
    assert gini or not {"train/kl", "train/gini", "val/gini"} & keys
    assert main(["test", "--config", str(config), "--wandb", "disabled",
                 "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt")]) == 0
    rows = [r for r in read_results(tmp_path / "run" / "results" / "test_results.csv") if r["subset"] == "all"]
    assert [(r["model"], r["source"], r["num_images"]) for r in rows] == [(name, "model", 8), (name, "oracle", 8)]
    assert all(0 <= rows[0][f"{m}_mean"] for m in metrics)


@pytest.mark.parametrize(
    ("name", "option", "value", "message"),
    [
        ("csae", "num_ot_samples", "0", "num_ot_samples"),
        ("csae", "gamma", "-1", "gamma must be non-negative"),
        ("planar", "kl_samples", "0", "kl_samples"),
        ("punet", "beta", "-0.5", "beta must be non-negative"),
    ],
)
def test_bad_model_configuration_fails_before_training(name: str, option: str, value: str, message: str,
                                                        tmp_path: Path) -> None:
    from tests.models.test_zoo import TINY_ARGS

    config = tiny_config(tmp_path, model={"class_path": name, "init_args": TINY_ARGS[name]})
    with pytest.raises((ValueError, TypeError), match=message):
        main(["fit", "--config", str(config), "--wandb", "disabled", f"--model.init_args.{option}", value])
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing may be trained or written"


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_second_fit_in_the_same_folder_replaces_last_ckpt(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=2)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    steps = []
    for max_steps in (2, 4):
        main(["fit", "--config", str(config), "--wandb", "disabled", "--trainer.max_steps", str(max_steps)])
        steps.append(torch.load(last, weights_only=True)["global_step"])
    assert steps == [2, 4]
    assert not list(last.parent.glob("last-v*.ckpt"))


@pytest.mark.parametrize("args", [["--model", "punet"], ["--model=punet"], ["--model.class_path", "punet"]])
def test_registry_name_on_command_line(args: list[str]) -> None:
    assert resolve_model_names(["fit", *args])[-1] == "probseg.models.punet.ProbUNet"


@pytest.mark.parametrize("model", ["punet", "ProbUNet", "probseg.models.punet.ProbUNet", "probseg.models.ProbUNet"])
def test_model_chosen_in_yaml(model: str, tmp_path: Path) -> None:
    cli = _cli(["--config", str(tiny_config(tmp_path, model=model)), "--wandb", "disabled"])
    assert type(cli.model) is ProbUNet
    assert cli.model.hparams.num_filters == [4, 8, 8]


def test_model_given_as_bare_registry_name(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    content = yaml.safe_load(config.read_text())
    content["model"] = "punet"
    config.write_text(yaml.safe_dump(content))
    cli = _cli(["--config", str(config), "--wandb", "disabled", "--model.init_args.num_filters", "[4, 8, 8]",
                "--model.init_args.convs_per_block", "1"])
    assert type(cli.model) is ProbUNet
    assert cli.model.hparams.num_filters == [4, 8, 8]


def test_registry_name_with_relative_nested_configs(tmp_path: Path) -> None:
    """Resolving a registry name must not break paths relative to the config file."""
    folder = tmp_path / "configs"
    folder.mkdir()
    content = yaml.safe_load(tiny_config(tmp_path).read_text())
    (folder / "data.yaml").write_text(yaml.safe_dump(content.pop("data")))
    (folder / "model.yaml").write_text(yaml.safe_dump(content.pop("model")))
    content["data"] = "data.yaml"
    content["model"] = "model.yaml"
    (folder / "main.yaml").write_text(yaml.safe_dump(content))
    cli = _cli(["--config", str(folder / "main.yaml"), "--wandb", "disabled"])
    assert type(cli.model) is ProbUNet and cli.model.hparams.num_filters == [4, 8, 8]
    assert cli.datamodule.hparams.image_size == 32
    assert sorted(p.name for p in folder.iterdir()) == ["data.yaml", "main.yaml", "model.yaml"], "copies left behind"


def test_registry_names_resolve_while_reading_read_only_configs(tmp_path: Path) -> None:
    """Names are resolved as jsonargparse reads each document: nothing is written, so a config in
    a read-only folder works and its files are untouched."""
    folder = tmp_path / "configs"
    folder.mkdir()
    config = tiny_config(tmp_path)
    text = config.read_text()
    (folder / "main.yaml").write_text(text)
    folder.chmod(0o555)
    try:
        before = set(Path(tempfile.gettempdir()).iterdir())
        cli = _cli(["--config", str(folder / "main.yaml"), "--wandb", "disabled"])
        assert type(cli.model) is ProbUNet
        assert (folder / "main.yaml").read_text() == text
        assert [p.name for p in folder.iterdir()] == ["main.yaml"]
        assert not [p for p in set(Path(tempfile.gettempdir()).iterdir()) - before if "probseg" in p.name]
    finally:
        folder.chmod(0o755)


def test_the_config_loader_resolves_model_names_only() -> None:
    from probseg.lightning_cli import ModelNameError, load_config

    loaded = load_config(
        "model: punet\n"
        "trainer: {default_root_dir: punet, callbacks: [{class_path: probseg.callbacks.GiniCallback}]}\n"
        "other: {class_path: csae, init_args: {beta: 2}}\n"
    )
    assert loaded["model"] == {"class_path": "probseg.models.punet.ProbUNet"}
    assert loaded["trainer"]["default_root_dir"] == "punet"  # a plain string, not a model
    assert loaded["trainer"]["callbacks"][0]["class_path"] == "probseg.callbacks.GiniCallback"
    assert loaded["other"] == {"class_path": "probseg.models.csae.ConditionalSinkhornAutoencoder", "init_args": {"beta": 2}}
    assert load_config("model: model.yaml")["model"] == "model.yaml"  # a model file, read in turn
    with pytest.raises(ModelNameError, match="Did you mean 'planar'"):
        load_config("class_path: planr")


def test_model_file_on_command_line(tmp_path: Path) -> None:
    model_file = tmp_path / "model.yaml"
    model_file.write_text(yaml.safe_dump({"class_path": "punet", "init_args": dict(TINY_PUNET)}))
    cli = _cli(["--config", str(tiny_config(tmp_path)), "--model", str(model_file), "--wandb", "disabled"])
    assert type(cli.model) is ProbUNet and cli.model.hparams.latent_dim == TINY_PUNET["latent_dim"]


def test_unknown_model_name_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, model="no_such_model")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--wandb", "disabled"])
    assert exit_info.value.code != 0
    assert "no_such_model" in capsys.readouterr().err


def test_base_class_is_refused(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, model={"class_path": "probseg.models.ProbSegModel"})
    with pytest.raises((TypeError, ValueError), match="base class; choose a zoo model"):
        _cli(["--config", str(config), "--wandb", "disabled"])


def test_validate_logs_val_terms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    assert main(["validate", "--config", str(config), "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    for key in ("val/loss", "val/rec", "val/kl"):
        assert key in out


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_validation_loss_is_deterministic_and_leaves_the_training_rng_alone(tmp_path: Path) -> None:
    cli = _cli(["--config", str(tiny_config(tmp_path)), "--wandb", "disabled"])
    cli.datamodule.setup("validate")
    batch = next(iter(cli.datamodule.val_dataloader()))
    torch.manual_seed(123)
    first = cli.model.validation_step(batch, 0)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = cli.model.validation_step(batch, 0)
    torch.testing.assert_close(first, second)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_first), "validation must not draw from the global RNG"


def test_predict_writes_hypotheses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, max_steps=1)
    assert main(["predict", "--config", str(config), "--wandb", "disabled",
                 "--model.init_args.num_predict_samples", "5"]) == 0
    files = sorted((tmp_path / "run" / "predictions").glob("*.npz"))
    assert len(files) == 8  # the 8 test images
    data = np.load(files[0])
    assert data["probabilities"].shape == (5, 2, 32, 32)
    assert data["raters"].shape == (3, 32, 32)
    assert "wrote hypotheses of 8 images" in capsys.readouterr().out


REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if p.name != "base.yaml")
"""The model files; each is stacked on its folder's base.yaml."""


def _experiment(config: Path) -> Any:
    return _cli(["--config", str(config.parent / "base.yaml"), "--config", str(config), "--wandb", "disabled"])


def test_experiment_files_say_only_what_differs() -> None:
    """A model file holds the model, its run folder and trainer settings that differ from its
    dataset's base.yaml; the base holds everything shared."""
    for config in EXPERIMENTS:
        content = yaml.safe_load(config.read_text())
        base = yaml.safe_load((config.parent / "base.yaml").read_text())
        assert set(content) == {"model", "trainer"} and "default_root_dir" in content["trainer"], config
        repeated = {k for k, v in content["trainer"].items() if base["trainer"].get(k) == v}
        assert not repeated, f"{config} repeats {repeated} of base.yaml"
    for base in (REPO / "experiments").rglob("base.yaml"):
        assert set(yaml.safe_load(base.read_text())) == {"seed_everything", "data", "trainer"}, base


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_experiment_config_builds(config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    options = yaml.safe_load(config.read_text())["model"]["init_args"].get("generator_options") or {}
    if "encoder_name" in options:  # generator="smp": skips without the optional extra probseg[smp]
        from tests.layers.test_generators import require_smp

        require_smp()
    monkeypatch.chdir(tmp_path)  # the configs' relative run folders land here
    cli = _experiment(config)
    assert cli.trainer.default_root_dir == yaml.safe_load(config.read_text())["trainer"]["default_root_dir"]
    stem = config.stem.removesuffix("_paper")
    name = stem.removesuffix("_soft").removesuffix("_ls").removesuffix("_kd").removesuffix("_teacher")
    name = name.removesuffix(f"_{options.get('encoder_name', '')}")  # e.g. unet_resnet50_soft.yaml
    assert cli.model.registry_name == name
    # Wang et al.'s reference recipe (README, "Soft labels and distillation as in Wang et al.")
    paper = config.stem.endswith("_paper")
    recipe = "paper" if paper else "probseg"
    assert cli.model.reconstruction.loss.recipe == recipe and cli.model.reconstruction.fusion_options["recipe"] == recipe
    if stem.endswith(("_soft", "_ls")):
        assert cli.model.fusion == ("weighted_mean" if stem.endswith("_soft") else "label_smoothing")
        assert cli.model.reconstruction.weights == {"ce": 0.25, "dml1": 0.75}
    elif paper:  # the KD preset: the label half of 0.25 CE + 0.75 DML1 on the majority vote
        assert cli.model.fusion == "majority" and cli.model.reconstruction.weights == {"ce": 0.125, "dml1": 0.375}
    else:
        assert cli.model.fusion == "random" and cli.model.reconstruction.weights == {"ce": 1.0}
    if stem.endswith("_kd"):  # the teacher is loaded when training starts, not here
        distiller = cli.model.distiller
        assert distiller.teacher_path == Path("runs/synthetic/unet_teacher/checkpoints/last.ckpt")
        assert distiller.weights == ({"ce": 0.125, "dml1": 0.375} if paper else {"ce": 1.0, "dml1": 1.0})
        assert distiller.kde.bandwidth == 1e-3 and distiller.kde.importance_weights is not paper
    else:
        assert cli.model.distiller is None


def test_soft_label_training_logs_each_reconstruction_component(tmp_path: Path) -> None:
    model = {"class_path": "punet", "init_args": {**TINY_PUNET, "fusion": "mean", "reconstruction": {"ce": 0.25, "dml1": 0.75}}}
    config = tiny_config(tmp_path, model=model, max_steps=2)
    assert main(["fit", "--config", str(config), "--wandb", "disabled"]) == 0
    keys = _metric_keys(tmp_path)
    assert {"train/rec_ce", "train/rec_dml1", "train/rec", "val/rec_ce", "val/rec_dml1", "val/rec"} <= keys
    (metrics,) = sorted(tmp_path.glob("run/logs/version_*/metrics.csv"))
    with open(metrics, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r.get("train/rec"))
    assert float(row["train/rec"]) == pytest.approx(float(row["train/rec_ce"]) + float(row["train/rec_dml1"]), rel=1e-5)


# Table 4 of the cSAE paper: beta, gamma, patience, N_eval (batch 32, lr 1e-4, weight decay 5e-5, L 6, N_OT 16).
TABLE_4 = {"lidc": (10, 10, 40, 16), "pancreas": (10, 1, 200, 16), "pancreatic-lesion": (10, 10, 500, 15),
           "brain-growth": (10, 10, 300, 28), "brain-tumor": (10, 1, 300, 15)}


@pytest.mark.parametrize("config", [p for p in EXPERIMENTS if "synthetic" not in p.parts and p.stem in ("punet", "planar", "csae")],
                         ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_paper_configs_follow_table_4(config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    from probseg.callbacks import EvaluationCallback

    monkeypatch.chdir(tmp_path)
    cli = _experiment(config)
    beta, gamma, patience, n_eval = TABLE_4[config.parent.name]
    model, data = cli.model, cli.datamodule
    assert (model.hparams.beta, model.lr, model.weight_decay, model.hparams.latent_dim) == (beta, 1e-4, 5e-5, 6)
    if model.registry_name == "csae":
        assert (model.hparams.gamma, model.hparams.num_ot_samples, model.hparams.sinkhorn_diameter) == (gamma, 16, 100.0)
    assert (data.batch_size, data.split_mode, data.augmentation is not None) == (32, "paper", True)
    stopping = next(c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping))
    assert (stopping.monitor, stopping.patience) == ("val/loss", patience)
    assert next(c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)).num_samples == n_eval
    assert cli.trainer.gradient_clip_val == 1.0


def test_nested_class_paths_are_not_taken_for_model_typos() -> None:
    """A callback or optimizer class named like a zoo class is left to jsonargparse."""
    from probseg.lightning_cli import load_config

    loaded = load_config("trainer: {callbacks: [{class_path: UNet}]}\nmodel: {class_path: punet}\n")
    assert loaded["trainer"]["callbacks"][0]["class_path"] == "UNet"
    assert loaded["model"]["class_path"] == "probseg.models.punet.ProbUNet"


@pytest.mark.parametrize(
    ("option", "base"),
    [
        ("--model.class_path=collections.OrderedDict", "ProbSegModel"),
        ("--data.class_path=collections.OrderedDict", "ProbSegDataModule"),
        ("--trainer.logger.class_path=collections.OrderedDict", "Logger"),
        ("--trainer.callbacks+=collections.OrderedDict", "Callback"),
    ],
)
def test_class_paths_outside_a_slots_base_class_are_refused(option: str, base: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A config names classes by import path; each slot only takes subclasses of its base class
    (model, data, logger, callbacks), refused before anything is built or trained."""
    config = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--wandb", "disabled", option])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "collections.OrderedDict" in err or "subclass of Callback" in err
    assert f"subclass of {base}" in err
    assert not (tmp_path / "run").exists()
