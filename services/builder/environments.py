"""Environments: a requirements spec resolved by pip's own resolver to an exact lock with hashes,
for the CPython and platform that a model image runs."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from services.common.errors import InvalidArgument, Unavailable

MAX_REQUIREMENTS = 1000
MAX_REQUIREMENTS_BYTES = 64 * 1024
PYTHON_VERSION = re.compile(r"3\.\d{1,2}")
# pip's complaints about configured file:// indexes that lack a package are noise, not reasons.
NOISE = ("is ignored: it is neither a file nor a directory",)


@dataclass(frozen=True)
class PackageIndex:
    """Where pip looks for packages; mirrors pip's own options."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False

    def pip_arguments(self) -> list[str]:
        arguments: list[str] = []
        if self.index_url:
            arguments += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            arguments += ["--extra-index-url", url]
        for link in self.find_links:
            arguments += ["--find-links", link]
        if self.no_index:
            arguments.append("--no-index")
        return arguments


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    sha256: str
    filename: str


@dataclass(frozen=True)
class EnvironmentLock:
    python_version: str
    packages: tuple[LockedPackage, ...]

    def requirements_text(self) -> str:
        """requirements.txt lines `name==version --hash=sha256:HEX`, installable with `--require-hashes`."""
        return "".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in self.packages)


def normalize_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements file, validated and canonical (comments and blank
    lines gone, names normalised, sorted, duplicates removed), so that the same spec written
    differently compares equal. Options, file references and URLs are refused: an environment must
    be resolvable from the package index alone."""
    if len(text.encode()) > MAX_REQUIREMENTS_BYTES:
        raise InvalidArgument(
            f"requirements are {len(text.encode())} bytes; at most {MAX_REQUIREMENTS_BYTES} are accepted",
            field="requirements",
        )
    lines = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        shown = line[:120]
        if line.startswith("-") or "://" in line or line.startswith((".", "/", "~")) or " @ " in line:
            raise InvalidArgument(
                f"requirements line {number} ({shown!r}): options, file paths and URLs are not allowed; list "
                "packages with versions, e.g. scikit-learn==1.5.2",
                field="requirements",
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            raise InvalidArgument(
                f"requirements line {number} ({shown!r}) is not a requirement: {error}", field="requirements"
            ) from None
        if requirement.url:
            raise InvalidArgument(f"requirements line {number} ({shown!r}): URLs are not allowed", field="requirements")
        requirement.name = canonicalize_name(requirement.name)
        lines.add(str(requirement))
        if len(lines) > MAX_REQUIREMENTS:
            raise InvalidArgument(f"at most {MAX_REQUIREMENTS} requirements are accepted", field="requirements")
    return sorted(lines)


def spec_digest(python_version: str, requirements: list[str], base_image: str) -> str:
    """sha256 hex of the canonical spec: equal specs, equal digests."""
    canonical = json.dumps({"python": python_version, "requirements": requirements, "base_image": base_image})
    return hashlib.sha256(canonical.encode()).hexdigest()


def platform_tags(python_version: str) -> list[str]:
    """pip's target options for CPython `python_version` on glibc Linux of this architecture, as
    deploy/build-image.sh downloads wheels (bookworm's glibc 2.36 and older manylinux tags)."""
    architecture = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    abi = "cp" + python_version.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    platforms = [f"manylinux_2_{minor}_{architecture}" for minor in range(36, 16, -1)]
    platforms.append(f"manylinux2014_{architecture}")
    if architecture == "x86_64":
        platforms += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    for tag in platforms:
        options += ["--platform", tag]
    return options


def resolve_lock(
    requirements: list[str], python_version: str, index: PackageIndex, *, timeout_seconds: float = 300
) -> EnvironmentLock:
    """Resolve with pip's resolver for the target Python without installing anything."""
    if not PYTHON_VERSION.fullmatch(python_version or ""):
        raise InvalidArgument(f"python_version {python_version[:20]!r} must look like 3.11", field="python_version")
    if not requirements:
        return EnvironmentLock(python_version, ())
    with tempfile.TemporaryDirectory(prefix="mlmesh-resolve-") as scratch:
        folder = Path(scratch)
        (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
        report = folder / "report.json"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--report",
            str(report),
            *platform_tags(python_version),
            *index.pip_arguments(),
            "-r",
            str(folder / "requirements.txt"),
        ]
        try:
            answer = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds, cwd=folder)
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"pip did not resolve the requirements within {timeout_seconds:g} s: the package index did not "
                "answer in time"
            ) from None
        if answer.returncode != 0:
            raise InvalidArgument(
                f"pip could not resolve the requirements: {pip_reason(answer.stderr)}", field="requirements"
            )
        installed = json.loads(report.read_text()).get("install", [])
    packages = [locked_package(item) for item in installed]
    return EnvironmentLock(python_version, tuple(sorted(packages, key=lambda package: package.name)))


def locked_package(item: dict) -> LockedPackage:
    """One item of pip's installation report as a locked package with the sha256 of its file."""
    metadata = item["metadata"]
    download = item.get("download_info", {})
    url = download.get("url", "")
    archive = download.get("archive_info", {})
    sha256 = archive.get("hashes", {}).get("sha256") or ""
    if not sha256 and archive.get("hash", "").startswith("sha256="):
        sha256 = archive["hash"].removeprefix("sha256=")
    if not sha256:
        # A file pip found through --find-links comes without a hash: hash the file itself.
        sha256 = hash_of(url)
    filename = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    return LockedPackage(canonicalize_name(metadata["name"]), metadata["version"], sha256, filename)


def hash_of(url: str) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def pip_reason(stderr: str) -> str:
    """pip's own reason: its ERROR lines (else its last lines), without the noise."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not any(n in line for n in NOISE)]
    errors = [line for line in lines if line.startswith("ERROR")]
    return " ".join(errors or lines[-5:])[:2000] or "pip failed without saying why"
