"""requirements.lock, the environment setup.sh, .ci/run and the image install, must agree
with pyproject.toml: every dependency locked, at a version its specifier admits, with
hashes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
REFRESH = "run `bash .ci/lock` to refresh requirements.lock"


def _locked() -> dict[str, tuple[Version, int]]:
    """{name: (version, number of hashes)} of requirements.lock."""
    text = (REPO / "requirements.lock").read_text()
    found = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", block)
        if match:
            found[canonicalize_name(match.group(1))] = (Version(match.group(2)),
                                                         block.count("--hash=sha256:"))
    return found


def _wanted() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]
            + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_locked_at_an_admitted_version_with_hashes():
    locked = _locked()
    problems = []
    for requirement in _wanted():
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement} is not locked")
            continue
        version, hashes = locked[name]
        if requirement.specifier and version not in requirement.specifier:
            problems.append(f"{requirement} but {name}=={version} is locked")
        if hashes == 0:
            problems.append(f"{name}=={version} has no hash")
    assert not problems, "; ".join(problems) + f": {REFRESH}"


def test_the_lock_is_what_setup_and_the_image_install():
    assert "--require-hashes -r requirements.lock" in (REPO / "setup.sh").read_text()
    assert "--require-hashes -r /tmp/requirements.lock" in (REPO / "infra/Dockerfile").read_text()
