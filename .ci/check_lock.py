"""Check that the virtual environment holds exactly what requirements.lock pins.

Every installed distribution (but herd itself) must be pinned in the lock at the installed
version, for this platform and Python. Run by .ci/run after installing; exits 1 naming each
difference, so a dependency added to pyproject.toml without `bash .ci/lock` is caught.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from pip._vendor.packaging.markers import Marker


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    pinned: dict[str, str] = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or "==" not in line:
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = requirement.partition("==")
        pinned[canonical(name.split("[", 1)[0].strip())] = version.strip()
    return pinned


def main() -> int:
    pinned = pins(Path(sys.argv[1]))
    problems = []
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name == "herd":
            continue
        if name not in pinned:
            problems.append(f"{name}=={dist.version} is installed but not in the lock")
        elif pinned[name] != dist.version:
            problems.append(f"{name}=={dist.version} is installed; the lock pins {pinned[name]}")
    for problem in sorted(problems):
        print(f"requirements.lock: {problem}", file=sys.stderr)
    if problems:
        print("refresh it with: bash .ci/lock (see its header)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
