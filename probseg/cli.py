"""Command-line entry point ``probseg``.

* ``probseg fit|validate|test|predict --config CFG``: Lightning's CLI. The model is chosen in YAML
  by registry name (``model: punet`` or ``class_path: punet``), class name or import path.
* ``probseg sample --ckpt PATH ...``: draw hypotheses from a checkpoint (see ``probseg sample -h``).
* ``probseg models``: list the registered models.

Logging defaults: a CSVLogger (``{default_root_dir}/logs``) and W&B in offline mode
(``{default_root_dir}/wandb``, no login, no network). ``--wandb online`` logs to the W&B server,
``--wandb disabled`` turns W&B off; offline runs upload later with ``wandb sync DIR``. Setting
``trainer.logger`` yourself replaces both.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

USAGE = """usage: probseg <command> [options]

Probabilistic image segmentation model zoo.

commands:
  fit        train a model            (probseg fit --config experiments/synthetic/punet.yaml)
  validate   evaluate on the validation split
  test       evaluate on the test split
  predict    draw hypotheses for the predict split
  sample     draw hypotheses from a checkpoint and write .npz files and PNG grids
  models     list the registered models

Run 'probseg <command> --help' for the options of a command.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``probseg <command>``; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command = args[0]
    if command in ("-V", "--version"):
        from probseg import __version__

        print(f"probseg {__version__}")
        return 0
    if command == "sample":
        from probseg.sampling import main as sample_main

        return sample_main(args[1:])
    if command == "models":
        from probseg.models import MODELS, class_path

        for name, cls in sorted(MODELS.items()):
            print(f"{name:<10} {class_path(cls)}")
        return 0
    if command in LIGHTNING_COMMANDS:
        run_lightning(args)
        return 0
    print(f"probseg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def run_lightning(args: list[str]) -> Any:
    """Run Lightning's CLI on ``args`` (subcommand first), registry names resolved."""
    with tempfile.TemporaryDirectory(prefix="probseg-config-") as tmp:
        return build_cli(resolve_model_names(args, Path(tmp)))


def build_cli(args: list[str], run: bool = True) -> Any:
    """Construct the probseg LightningCLI (imports Lightning, so kept out of ``--help``)."""
    from probseg.lightning_cli import ProbSegCLI

    # LightningCLI warns when it gets ``args`` while sys.argv holds arguments too: ours are the
    # same arguments, rewritten, so it sees only the program name while it parses and runs.
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        return ProbSegCLI(args=args, run=run)
    finally:
        sys.argv = argv


def _resolve_name(value: Any) -> Any:
    from probseg.models import MODELS, class_path

    return class_path(MODELS[value]) if isinstance(value, str) and value in MODELS else value


def _resolve_config_file(path: str, tmp: Path) -> str:
    """Copy of a YAML config with registry model names replaced by class paths (or ``path``)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return path  # not a file: Lightning's CLI reports it (or parses it as inline YAML)
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return path  # let jsonargparse report the syntax error with the file name
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, str):
        resolved = _resolve_name(model)
        if resolved == model:
            return path
        config["model"] = {"class_path": resolved}
    elif isinstance(model, dict) and "class_path" in model:
        resolved = _resolve_name(model["class_path"])
        if resolved == model["class_path"]:
            return path
        model["class_path"] = resolved
    else:
        return path
    out = tmp / f"{len(list(tmp.iterdir()))}-{file.name}"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(out)


def resolve_model_names(args: list[str], tmp: Path) -> list[str]:
    """Replace registry names ("punet") by class paths in ``--model`` arguments and config files."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in ("--config", "-c", "--model", "--model.class_path"):
            if not eq and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            elif not eq:
                out.append(arg)
                break
            value = _resolve_config_file(value, tmp) if key in ("--config", "-c") else _resolve_name(value)
            out += [key, value]
        else:
            out.append(arg)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
