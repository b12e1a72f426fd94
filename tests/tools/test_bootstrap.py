"""scripts/bootstrap.sh, the one way to install: what it refuses before it changes anything."""
import shutil
import subprocess

from conftest import REPO


def test_a_disk_too_full_for_a_new_environment_is_one_line_and_nothing_is_made(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "bootstrap.sh", tmp_path / "scripts")
    proc = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "FASTTRAIN_VERSIONS": "oldest",
                               "FASTTRAIN_NEEDS_GIB": str(1 << 40)})  # more than any disk holds
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "GiB free under" in proc.stderr and ".venv-oldest" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scripts"]  # no half-made environment
