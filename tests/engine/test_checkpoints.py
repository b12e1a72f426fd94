"""Checkpoints hold tensors and plain data only, and are read weights-only: a checkpoint that carries
code is refused in one line by every reader, never unpickled; an earlier fasttrain's checkpoint
converts, on the user's word, with one command."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from fasttrain.engine import checkpoint
from fasttrain.errors import CheckpointError


class Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        return (open, (self.witness, "w"))


def good_state(**extra):
    return {"model": {"w": torch.zeros(2)}, "recipe": {"method": "selfcon"}, "method": "selfcon",
            "arch": "resnet18", "epoch": 1, "updates": 3, "rng": [checkpoint.rng_state()], **extra}


def test_what_the_trainer_saves_reads_back_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.atomic_save(good_state(), path)
    state = torch.load(path, weights_only=True)
    before = np.random.get_state()[1].copy(), torch.get_rng_state()
    np.random.rand(5), torch.rand(5)
    checkpoint.set_rng_state(state["rng"][0])
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1])


@pytest.mark.parametrize("where", ["top", "nested in an extra entry"])
def test_a_checkpoint_carrying_code_is_refused_and_never_run(tmp_path, where):
    witness, path = tmp_path / "ran", tmp_path / "c.pt"
    state = {"payload": Planted(witness)} if where == "top" else good_state(extra={"x": [Planted(witness)]})
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors and plain data") as err:
        checkpoint.load(path, "run.resume")
    assert "--upgrade-trusted" in str(err.value) and str(path) in str(err.value)
    assert not witness.exists()


def test_every_command_refuses_a_planted_checkpoint_in_one_line(tmp_path):
    witness, path = tmp_path / "ran", tmp_path / "c.pt"
    torch.save(good_state(extra=Planted(witness)), path)
    commands = [[sys.executable, "fasttrain/run.py", "recipes/demo_selfcon.yaml", "--eval-only", str(path),
                 f"run.dir={tmp_path / 'run'}"],
                [sys.executable, "-m", "fasttrain.export", str(path), str(tmp_path / "out.pt")]]
    for command in commands:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "holds Python objects besides tensors" in proc.stderr
    assert not witness.exists()


def test_an_earlier_checkpoint_converts_on_the_users_word(tmp_path):
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    rng = checkpoint.rng_state()
    rng["numpy"] = np.random.get_state()  # how earlier versions kept it: a pickled numpy array
    torch.save(good_state(rng=[rng]), old)
    with pytest.raises(CheckpointError, match="--upgrade-trusted"):
        checkpoint.load(old, "run.resume")
    proc = subprocess.run([sys.executable, "-m", "fasttrain.engine.checkpoint", "--upgrade-trusted", str(old),
                           str(new)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state = checkpoint.load(new, "run.resume")
    assert np.array_equal(state["rng"][0]["numpy"]["keys"].numpy(), rng["numpy"][1].astype(np.int64))


def test_export_refuses_to_overwrite_what_it_reads_and_a_foreign_classifier_file(tmp_path):
    from fasttrain.export import export
    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save(good_state(), ckpt)
    with pytest.raises(CheckpointError, match="which this export reads"):
        export(ckpt, ckpt)
    torch.save({"something": torch.zeros(1)}, tmp_path / checkpoint.LINEAR_CLASSIFIERS)
    with pytest.raises(CheckpointError, match="not a linear-classifier file"):
        export(ckpt, tmp_path / "out.pt")


def test_a_disk_that_fills_mid_checkpoint_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """torch's zip writer turns a failed write into a RuntimeError of its own; the caller (run.py) turns
    an OSError into one line and exit status 1, the previous checkpoint intact."""
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save(good_state(), path)
    before = path.read_bytes()

    def full(obj, file):
        file.write(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 22")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=f"cannot write {path}.*disk full"):
        checkpoint.atomic_save(good_state(), path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".checkpoint*"))
