"""plugin/requirements.lock pins what the managed plugin's image installs. It must cover
pybridge's dependencies as pyproject.toml states them: a dependency changed without
`python3 plugin/lock.py` fails here, before an image build would."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "plugin" / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")
_HASH = re.compile(r"^    --hash=sha256:[0-9a-f]{64}( \\)?$")


def locked() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes), checking the file's shape on the way."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if line.startswith("#"):
            continue
        if pin := _PIN.match(line):
            current = canonicalize_name(pin.group(1))
            assert current not in pins, f"{current} is pinned twice"
            pins[current] = (pin.group(2), 0)
            continue
        assert _HASH.match(line), f"not a pin or a sha256 hash: {line!r}"
        assert current is not None
        version, hashes = pins[current]
        pins[current] = (version, hashes + 1)
    return pins


def test_every_dependency_is_pinned_with_hashes_at_a_version_pyproject_allows() -> None:
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The image installs the cluster extra too (PYDRIVER_CLUSTER on the managed plugin).
    dependencies = [*project["dependencies"], *project["optional-dependencies"]["cluster"]]
    for text in dependencies:
        wanted = Requirement(text)
        name = canonicalize_name(wanted.name)
        assert name in pins, f"{name} is not in {LOCK.name}: run python3 plugin/lock.py"
        version, _ = pins[name]
        assert wanted.specifier.contains(version), f"{name}=={version} does not meet {text}"
    assert all(hashes >= 1 for _, hashes in pins.values()), pins
    # The lock says what it was made for; the same list as pyproject.toml's.
    assert f"for: {', '.join(dependencies)}." in LOCK.read_text()
