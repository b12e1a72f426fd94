"""One console entry point (``fasttrain <command>``, also ``python -m fasttrain``) for every command."""
import subprocess
import sys

from conftest import REPO
from fasttrain.cli import COMMANDS


def fasttrain(*args):
    return subprocess.run([sys.executable, "-m", "fasttrain", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_the_entry_point_lists_every_command_and_refuses_an_unknown_one():
    listed = fasttrain("--help")
    assert listed.returncode == 0 and all(name in listed.stdout for name in COMMANDS)
    unknown = fasttrain("trian")
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


def test_a_command_runs_its_module_with_the_rest_of_the_arguments(tmp_path):
    proc = fasttrain("train", "recipes/demo_selfcon.yaml", "train.log_evry=1")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "fasttrain: error: recipes/demo_selfcon.yaml: train.log_evry: unknown key"
    proc = fasttrain("upgrade-checkpoint", tmp_path / "missing.pt", tmp_path / "new.pt")
    assert proc.returncode == 2 and "missing.pt" in proc.stderr and "Traceback" not in proc.stderr
