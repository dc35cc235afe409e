"""Write the pinned installs into a directory: ``lock.txt`` and ``transformers-oldest.txt``.

Run by ``bash bootstrap.sh lock`` with the Python of a fresh venv holding the newest versions that
pyproject.toml allows; the files are copied into requirements/ once the suite passed there.

- ``lock.txt``: pip constraints, every installed distribution at its version (the quick start and CI
  install ``-c requirements/lock.txt``).
- ``transformers-oldest.txt``: transformers at pyproject's lower bound and the packages it needs at
  other versions than the lock's (tests/test_hf_transformers_versions.py installs these beside the
  lock's and runs the HF tests on them).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pip(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True,
                          text=True).stdout


def lower_bound(package: str) -> str:
    """The ``>=`` version of ``package`` in pyproject.toml's dependencies or extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    for spec in map(Requirement, specs):
        if spec.name == package:
            return next(s.version for s in spec.specifier if s.operator == ">=")
    raise SystemExit(f"pyproject.toml has no lower bound for {package}")


def header(what: str) -> str:
    return (f"# {what}\n# Written by `bash bootstrap.sh lock` (Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}); do not edit by hand.\n")


def dry_run(*requirements: str) -> list[dict]:
    """What ``pip install`` of ``requirements`` would install or change here (pip's report)."""
    return json.loads(pip("install", "--dry-run", "--quiet", "--report", "-",
                          *requirements))["install"]


# Packages transformers imports whenever they are installed, whatever extras were asked for:
# the oldest transformers must find them in the range its extras declare.
IMPORTED_WHEN_INSTALLED = ("kernels",)


def oldest_transformers(version: str) -> list[dict]:
    """What installing transformers ``version`` here changes. kernels (the newest transformers
    needs 0.19, which transformers 5.0 fails to import with) is held to the range the oldest
    transformers' extras declare when this environment has it at another version."""
    install = dry_run(f"transformers=={version}")
    transformers = next(i["metadata"] for i in install if i["metadata"]["name"] == "transformers")
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions()}
    held = set()
    for req in map(Requirement, transformers["requires_dist"]):
        have = installed.get(canonicalize_name(req.name))
        if canonicalize_name(req.name) in IMPORTED_WHEN_INSTALLED and have \
                and have not in req.specifier:
            held.add(f"{req.name}{req.specifier}")
    return dry_run(f"transformers=={version}", *sorted(held)) if held else install


def main(out: str) -> None:
    out_dir = Path(out)
    frozen = pip("freeze", "--exclude-editable")
    (out_dir / "lock.txt").write_text(
        header("pip constraints: the versions CI last passed with.") + frozen)
    version = lower_bound("transformers")
    pins = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}"
                  for item in oldest_transformers(version))
    (out_dir / "transformers-oldest.txt").write_text(
        header(f"transformers {version} (pyproject's lower bound) and what it needs beyond the lock.")
        + "\n".join(pins) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
