"""Tiny real wheels for tests that resolve or install packages without a network."""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    requires: tuple[str, ...] = (),
    *,
    tag: str = "py3-none-any",
    requires_python: str | None = None,
) -> Path:
    """Writes an installable wheel of `name` `version` into `folder` and returns its path.

    The wheel holds one module, `<name>/__init__.py` with `VERSION = '<version>'`. `requires` become
    Requires-Dist lines; `tag` (python-abi-platform) is the wheel's compatibility tag.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # Wheel file names and import names use underscores where project names may have - or .
    module = re.sub(r"[-_.]+", "_", name).lower()
    dist_info = f"{module}-{version}.dist-info"
    metadata = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
    if requires_python:
        metadata.append(f"Requires-Python: {requires_python}\n")
    metadata += [f"Requires-Dist: {requirement}\n" for requirement in requires]
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": "".join(metadata),
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: mlmesh-tests\nRoot-Is-Purelib: {str(tag.endswith('-any')).lower()}\n"
            f"Tag: {tag}\n"
        ),
    }
    record = "".join(f"{member},{_record_hash(text)},{len(text.encode())}\n" for member, text in files.items())
    path = folder / f"{module}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
        wheel.writestr(f"{dist_info}/RECORD", record + f"{dist_info}/RECORD,,\n")
    return path


def _record_hash(text: str) -> str:
    """A RECORD hash: urlsafe base64 of the sha256, without padding (the wheel specification)."""
    digest = hashlib.sha256(text.encode()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
