"""The HF remote code on the oldest and the newest transformers that pyproject.toml allows.

The suite itself runs on the lock's transformers (the newest, when `bash bootstrap.sh lock` wrote it).
Here tests/test_hf_modeling.py runs again, in a subprocess, on the oldest: the packages of
requirements/transformers-oldest.txt are installed with `pip install --target` into a cache directory
named after that file's contents (reused by later runs) and put in front of the environment's own.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(os.environ.get("DSMOE_REQUIREMENTS", ROOT / "requirements"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsmoe_megatron"


def transformers_requirement() -> Requirement:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return next(r for r in map(Requirement, extras["hf"]) if r.name == "transformers")


def oldest_pins() -> dict[str, Version]:
    lines = (REQUIREMENTS / "transformers-oldest.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {pin.name: Version(next(iter(pin.specifier)).version) for pin in pins}


def install(pins: dict[str, Version]) -> Path:
    """The pinned packages, without their dependencies (the pins hold those that differ)."""
    requirements = sorted(f"{name}=={version}" for name, version in pins.items())
    key = hashlib.sha256(" ".join(requirements).encode()).hexdigest()[:12]
    target = CACHE / f"transformers-oldest-{key}"
    if not target.is_dir():
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(partial), *requirements], check=True, timeout=900)
        try:
            partial.rename(target)
        except OSError:  # another run finished first
            shutil.rmtree(partial)
    return target


def test_installed_transformers_is_in_the_allowed_range():
    import transformers

    assert Version(transformers.__version__) in transformers_requirement().specifier


@pytest.mark.slow
def test_hf_modeling_on_the_oldest_allowed_transformers():
    requirement = transformers_requirement()
    oldest = Version(next(s.version for s in requirement.specifier if s.operator == ">="))
    pins = oldest_pins()
    assert pins.get("transformers") == oldest, (
        f"requirements/transformers-oldest.txt does not pin transformers {oldest}, pyproject's lower "
        "bound: run `bash bootstrap.sh lock`")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(install(pins)), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Version(version) == oldest
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(ROOT / "tests" / "test_hf_modeling.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "passed" in summary and "skipped" not in summary, (
        proc.stdout[-5000:] + proc.stderr[-2000:])
