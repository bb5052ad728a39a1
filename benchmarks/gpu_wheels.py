"""Wheels for the GPU machine: what samkd needs there beyond what its image has.

The lent GPU machine reaches no package registry. Its Python 3.12 has torch 2.11,
torchvision, numpy, pillow, h5py, typer, rich, pyyaml and matplotlib; the rest of samkd's
requirements travel as wheels in `gpu-wheels/` (ignored by git), which `gpu_check.sh`
installs into a scratch folder before it runs.

    python -m benchmarks.gpu_wheels download      # fetch the pinned wheels, then check them
    python -m benchmarks.gpu_wheels check         # every requirement is carried or there
    python -m benchmarks.gpu_wheels install SITE  # check, install into SITE, verify imports
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import zipfile
from importlib.metadata import Distribution, PackageNotFoundError, distributions
from importlib.metadata import version as version_of
from pathlib import Path

import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import parse_tag, sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEELS = REPO_ROOT / "gpu-wheels"

# The versions samkd is tested with here. typing-extensions is on the machine too, but older
# than pydantic 2.14 accepts, so it travels as well.
CARRIED = {
    "segment-anything": "1.0",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "pydantic-settings": "2.16.3",
    "annotated-types": "0.8.0",
    "typing-extensions": "4.16.0",
    "typing-inspection": "0.4.5",
    "python-dotenv": "1.2.4",
    "loguru": "0.7.3",
    "pycocotools": "2.0.11",
    "zlib-ng": "1.1.0",
}

# On the machine's image already (device README, KINDS.md); None: version not recorded.
ON_MACHINE: dict[str, str | None] = {
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "numpy": "2.5.2",
    "pillow": None,
    "h5py": None,
    "typer": None,
    "rich": None,
    "pyyaml": None,
    "matplotlib": None,
}

# Where the machine's wheels must run: CPython 3.12 on manylinux x86-64.
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MARKER_ENVIRONMENT = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


class WheelError(Exception):
    """A missing, extra or unsatisfied wheel; its message is one line."""


def download(folder: Path) -> None:
    """Fetch every pinned wheel for the machine into `folder` (kept ones are not fetched
    again) and remove any other wheel, so that one version of each remains."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--implementation", "cp"]
    command += ["--python-version", PYTHON_VERSION]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += ["--dest", str(folder)]
    command += [f"{name}=={version}" for name, version in CARRIED.items()]
    subprocess.run(command, check=True)
    for path in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        if CARRIED.get(name) != str(version):
            path.unlink()


def requirements_of(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    lines = re.findall(r"^Requires-Dist: (.+)$", text, flags=re.MULTILINE)
    return [Requirement(line) for line in lines]


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def applies(requirement: Requirement) -> bool:
    """Whether `requirement` is needed on the machine (markers for its Python, no extras)."""
    marker: Marker | None = requirement.marker
    return marker is None or marker.evaluate(MARKER_ENVIRONMENT)


def check(folder: Path) -> list[str]:
    """Raise `WheelError` unless `folder` holds the pinned wheels alone and every requirement
    of samkd and of those wheels is carried or on the machine, at an accepted version.
    Returns the wheel file names."""
    found: dict[str, Version] = {}
    names = []
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in found:
            raise WheelError(f"{folder}: two wheels of {name}; keep one")
        found[name] = version
        names.append(path.name)
    missing = sorted(set(CARRIED) - set(found))
    if missing:
        raise WheelError(
            f"{folder}: no wheel of {', '.join(missing)}; run bash benchmarks/gpu_wheels.sh"
        )
    for name, version in found.items():
        if name not in CARRIED:
            raise WheelError(f"{folder}: {name} is not pinned in benchmarks/gpu_wheels.py")
        if str(version) != CARRIED[name]:
            raise WheelError(
                f"{folder}: {name} {version}, pinned {CARRIED[name]}; "
                "run bash benchmarks/gpu_wheels.sh"
            )
    needs = [("samkd", requirement) for requirement in project_requirements()]
    for path in sorted(folder.glob("*.whl")):
        owner = str(parse_wheel_filename(path.name)[0])
        needs += [(owner, requirement) for requirement in requirements_of(path)]
    for owner, requirement in needs:
        if not applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            version: str | None = str(found[name])
        elif name in ON_MACHINE:
            version = ON_MACHINE[name]
        else:
            raise WheelError(
                f"{owner} needs {requirement}, which is neither carried nor on the GPU machine"
            )
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            raise WheelError(f"{owner} needs {requirement}, the GPU machine would have {version}")
    return names


def require_on_path(site: Path) -> Path:
    site = site.resolve()
    if not any(Path(entry).resolve() == site for entry in sys.path if entry):
        raise WheelError(f"{site} is not on PYTHONPATH")
    return site


def install(folder: Path, site: Path) -> None:
    """Install the wheels of `folder` into `site` as the GPU machine does: pip, no index, no
    dependencies resolved, for CPython 3.12 on manylinux x86-64 whatever runs it."""
    require_on_path(site)
    wheels = sorted(str(path) for path in folder.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    command += ["--no-compile", "--no-cache-dir", "--only-binary=:all:"]
    command += ["--implementation", "cp", "--python-version", PYTHON_VERSION]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += ["--target", str(site), *wheels]
    subprocess.run(command, check=True)


def runs_here(distribution: Distribution) -> bool:
    """Whether this interpreter can load the distribution's wheel (a pure-Python one, or one
    built for this Python and platform)."""
    text = distribution.read_text("WHEEL") or ""
    wheel_tags = set()
    for line in re.findall(r"^Tag: (.+)$", text, flags=re.MULTILINE):
        wheel_tags |= parse_tag(line.strip())
    return not wheel_tags.isdisjoint(sys_tags())


def top_level(distribution: Distribution) -> list[str]:
    """The distribution's top-level modules and packages, and its .dist-info folder."""
    names = {file.parts[0] for file in distribution.files or []}
    return sorted(name for name in names if name not in {"..", "__pycache__"})


def verify(site: Path) -> tuple[list[str], list[str]]:
    """Raise `WheelError` unless `site` holds every pinned distribution and each of their
    modules imports from there (`site` comes before the interpreter's own packages).

    A wheel built for another Python than this interpreter's (a dry run on Python 3.11 of the
    machine's 3.12 wheels) cannot load: its files are moved to `site`-aside, and this
    interpreter's own install of the same version must stand in. On the GPU machine every
    wheel loads. Returns the modules imported from `site` and the distributions standing in.
    """
    site = require_on_path(site)
    installed = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(site)])}
    for name, version in CARRIED.items():
        if name not in installed:
            raise WheelError(f"{site}: {name} is not installed")
        if installed[name].version != version:
            raise WheelError(f"{site}: {name} is {installed[name].version}, not {version}")
    aside = site.with_name(site.name + "-aside")
    stand_ins = []
    modules = []
    for name, distribution in sorted(installed.items()):
        names = top_level(distribution)
        if not runs_here(distribution):
            aside.mkdir(exist_ok=True)
            for entry in names:
                (site / entry).rename(aside / entry)
            stand_ins.append(name)
            continue
        modules += [n.removesuffix(".py") for n in names if not n.endswith(".dist-info")]
    importlib.invalidate_caches()
    for name in stand_ins:
        try:
            here = version_of(name)
        except PackageNotFoundError:
            here = None
        if here != CARRIED[name]:
            has = f"{name} {here}" if here else f"no {name}"
            raise WheelError(
                f"{name}: its wheel is for Python {PYTHON_VERSION}, and this interpreter has "
                f"{has} to stand in for {CARRIED[name]}"
            )
    for module in sorted(modules):
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin is None or not Path(origin).resolve().is_relative_to(site):
            raise WheelError(f"{module} imports from {origin}, not from {site}")
    return sorted(modules), stand_ins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the wheel folder")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("download", help="fetch the pinned wheels, then check them")
    commands.add_parser("check", help="every requirement is carried or on the machine")
    install_parser = commands.add_parser("install", help="check, install into SITE, verify")
    install_parser.add_argument("site", type=Path)
    args = parser.parse_args()
    try:
        if args.command == "download":
            download(args.wheels)
        names = check(args.wheels)
        print(f"{len(names)} wheels in {args.wheels}, every requirement met")
        if args.command == "install":
            install(args.wheels, args.site)
            modules, stand_ins = verify(args.site)
            print(f"installed into {args.site}; imported from there: {', '.join(modules)}")
            if stand_ins:
                print(
                    f"built for Python {PYTHON_VERSION}, so this interpreter's own install of "
                    f"the same version stands in: {', '.join(stand_ins)}"
                )
    except WheelError as error:
        sys.exit(f"error: {error}")
    except subprocess.CalledProcessError as error:
        sys.exit(f"error: pip {error.cmd[3]} exited with status {error.returncode}")


if __name__ == "__main__":
    main()
