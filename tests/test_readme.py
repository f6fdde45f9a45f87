"""Every command in the README's code blocks runs, so the README cannot rot.

Each ``bash`` block runs in a scratch folder holding the repository's configs, a tiny trained
checkpoint where the README expects one, and tiny input files. Shims keep it fast: ``probseg
fit|validate|test|predict`` commands are recorded by the shell and then checked in this process
with ``--print_config`` (the full parse and validation of the config and every override, without
training); ``probseg benchmark`` runs with ``--dry-run`` (configs checked, commands printed);
``make`` is what CI runs anyway; ``srun`` runs its command. Every other command
(sample, results, data summary, convert, models, ``--help``) runs for real.
Inline ``python benchmarks/...`` commands must name scripts that exist and parse ``--help``.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probseg.cli import main
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
BIN = Path(sys.executable).parent
SHIMS = {
    # Lightning commands are recorded (one NUL-separated argv per line) for an in-process check.
    "probseg": 'case "$1" in fit|validate|test|predict) case " $* " in *" --help "*) ;; *)\n'
               '  printf "%s\\0" "$@" >> "$PROBSEG_RECORD"; echo >> "$PROBSEG_RECORD"; exit 0 ;; esac ;;\n'
               # a benchmark is many fits: its configs are checked and its commands printed, nothing trains
               f'  benchmark) exec "{BIN}/probseg" "$@" --dry-run ;; esac\n'
               f'exec "{BIN}/probseg" "$@"\n',
    "make": "exit 0\n",
    "srun": 'exec "$@"\n',
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "experiments", root / "experiments")
    # A tiny trained run: its checkpoint and results stand in for the README's runs.
    assert main(["fit", "--config", str(tiny_config(root / "tiny", max_steps=2)), "--wandb", "disabled"]) == 0
    run = root / "tiny" / "run"
    assert main(["test", "--config", str(root / "tiny" / "tiny.yaml"), "--wandb", "disabled",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    for folder in ("runs/demo", "runs/synthetic/punet", "runs/lidc/punet/fold0"):
        (root / folder).mkdir(parents=True)
        shutil.copytree(run / "checkpoints", root / folder / "checkpoints")
        shutil.copytree(run / "results", root / folder / "results")
    # Inputs the README's commands name.
    import nibabel as nib
    from PIL import Image

    np.save(root / "scan.npy", np.random.rand(32, 32).astype(np.float32))
    Image.fromarray((np.random.rand(32, 32) * 255).astype(np.uint8)).save(root / "slice.png")
    nib.save(nib.Nifti1Image(np.random.rand(32, 32, 50).astype(np.float32), np.eye(4)), root / "volume.nii.gz")
    image = np.random.rand(32, 32).astype(np.float32)
    entries = {f"LIDC-IDRI-000{i}_s": {"image": image, "masks": [(image > t).astype(np.uint8) for t in (.2, .4, .6, .8)],
                                        "series_uid": f"uid{i}"} for i in range(1, 6)}
    with open(root / "data_lidc.pickle", "wb") as f:
        pickle.dump(entries, f)
    (root / "data" / "lidc").mkdir(parents=True)
    shims = root / "shims"
    shims.mkdir()
    for name, body in SHIMS.items():
        (shims / name).write_text("#!/bin/bash\n" + body)
        (shims / name).chmod(0o755)
    return root


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_code_block_runs(block: str, scratch: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    record = scratch / f"record-{abs(hash(block))}.txt"
    record.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{scratch / 'shims'}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "disabled", "PROBSEG_RECORD": str(record)}
    done = subprocess.run(["bash", "-e", "-c", block], cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{done.stderr[-3000:]}"
    monkeypatch.chdir(scratch)
    commands = [line.split("\0")[:-1] for line in record.read_text().split("\n") if line] if record.exists() else []
    written = re.findall(r"probseg (?:fit|validate|test|predict)(?! --help)", block)
    assert len(commands) >= len(written), f"{len(written)} Lightning commands in the block, {len(commands)} recorded"
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--print_config"])
        assert exit_info.value.code in (0, None), f"probseg {' '.join(argv)}: {capsys.readouterr().err[-2000:]}"
    capsys.readouterr()


def test_readme_names_only_existing_benchmarks_and_they_parse() -> None:
    scripts = sorted(set(re.findall(r"python (benchmarks/\w+\.py)", README)))
    assert scripts, "the README documents the benchmarks"
    for script in scripts:
        done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{script} --help failed: {done.stderr[-1000:]}"


def test_every_repository_path_the_readme_names_exists() -> None:
    paths = set(re.findall(r"`((?:experiments|benchmarks|notebooks|probseg)/[\w./-]+\.(?:yaml|py|ipynb))`", README))
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing
