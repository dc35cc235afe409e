"""`bootstrap.sh` refuses a fresh install on a disk too full for it, before pip starts."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fake_tools(bin_dir: Path, free_kb: int, marker: Path):
    """A `df` reporting `free_kb` available, and a `python3.12` that records being asked for a venv."""
    bin_dir.mkdir()
    (bin_dir / "df").write_text(
        "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"echo 'fake 999999999 1 {free_kb} 1% /'\n")
    (bin_dir / "python3.12").write_text(
        f'#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "$@" > {marker}\nexit 3\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def _bootstrap(tmp_path, free_kb):
    marker = tmp_path / "venv-requested"
    _fake_tools(tmp_path / "bin", free_kb, marker)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "DSMOE_VENV": str(tmp_path / "new" / "venv"), "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "bootstrap.sh"), "test"], env=env,
                         capture_output=True, text=True, timeout=60)
    return run, marker


def test_a_full_disk_is_refused_before_the_venv_is_made(tmp_path):
    run, marker = _bootstrap(tmp_path, free_kb=2 * 1024 * 1024)
    assert run.returncode == 1
    assert "has only 2 GB free" in run.stderr and "DSMOE_VENV" in run.stderr
    assert "Traceback" not in run.stderr
    assert not marker.exists() and not (tmp_path / "new").exists()


def test_enough_space_goes_on_to_make_the_venv(tmp_path):
    run, marker = _bootstrap(tmp_path, free_kb=50 * 1024 * 1024)
    assert run.returncode == 3, run.stderr
    assert marker.read_text().split() == ["-m", "venv", str(tmp_path / "new" / "venv")]
