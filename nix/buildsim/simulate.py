#!/usr/bin/env python3
"""Build and check immich-ml the way nixpkgs' buildPythonApplication would, from what nix/package.nix gives it.

`record` evaluates nix/package.nix against the stub package set of record.nix and prints what it was given,
with the fetchPypi wheels it names and the check command pytestCheckHook would run. `run` realises the stub
store paths (PyPI installs and wheels, host files), copies exactly the `src` fileset, and runs builder.sh's
phases as `nobody` in a fresh network namespace; it exits non-zero when a phase (the check included) fails.

    nix/buildsim/simulate.py record [--package nix/package.nix] [--lib LIB]
    nix/buildsim/simulate.py fetch [--package nix/package.nix] [--lib LIB]
    nix/buildsim/simulate.py run [--lib LIB] [--summary summary.json] [--keep]

LIB is a nixpkgs `lib` folder (or a checkout holding lib/); default $NIXPKGS_LIB, else the stand-in
nix/stand-in. See docs/nixos.md, "How the Nix build is checked without Nix".
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INPUTS = json.loads((HERE / "inputs.json").read_text())
BUILDER_USER = 65534  # nobody/nogroup, as Nix's nixbld users: no home, no rights to the checkout
# Where PyPI installs and fetchPypi wheels are kept between runs (readable by the build user).
CACHE = Path(os.environ.get("IMMICH_ML_BUILDSIM_CACHE", "/var/tmp/immich-ml-buildsim"))
# stdenv's tools; everything else on PATH comes from nativeCheckInputs, as in the build sandbox.
BASIC_TOOLS = (
    "bash sh cat cp mv rm ln ls mkdir mktemp rmdir chmod touch env head tail sort uniq tr cut wc dirname "
    "basename readlink realpath sed grep awk find xargs tar gzip xz bzip2 diff cmp patch id uname date "
    "tee true false test printf echo expr stat du install od sha256sum sleep"
).split()


@dataclass(frozen=True)
class Wheel:
    """A fetchPypi call, decoded from its stub store path (<store>/pypi/<python>/<hash>/<file>)."""

    path: str
    python: str
    hash: str
    file: str

    def download_arguments(self) -> list[str]:
        """`pip download` arguments that fetch exactly this file whatever the host (its name's tags)."""
        name, version, python, abi, platform = self.file.removesuffix(".whl").split("-")
        arguments = [f"{name}=={version}"]
        if platform != "any":
            digits = python.removeprefix("cp")
            arguments += ["--python-version", f"{digits[0]}.{digits[1:]}", "--abi", abi]
            arguments += ["--platform", platform.split(".")[0]]
        return arguments


def find_lib(given: str | None) -> Path:
    """The nixpkgs-compatible `lib` to evaluate with: the argument, $NIXPKGS_LIB, else our stand-in."""
    candidate = Path(given or os.environ.get("NIXPKGS_LIB") or REPO / "nix" / "stand-in")
    if (candidate / "lib" / "default.nix").is_file():
        candidate = candidate / "lib"
    if not (candidate / "default.nix").is_file():
        sys.exit(f"buildsim: no nixpkgs lib at {candidate} (pass --lib or set NIXPKGS_LIB)")
    return candidate.resolve()


def evaluate(package: Path, lib: Path, store: Path) -> dict[str, Any]:
    """What package.nix gives buildPythonApplication, with store paths under ``store``.

    The interpreter's version is this process's: the PyPI installs are made for it.
    """
    command = ["nix-instantiate", "--store", "dummy://", "--eval", "--strict", "--json", str(HERE / "record.nix")]
    command += ["--arg", "lib", f"import {lib}", "--argstr", "storeDir", str(store)]
    command += ["--arg", "package", str(package.resolve())]
    command += ["--argstr", "pythonVersion", "{}.{}".format(*sys.version_info)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "NIX_PATH": ""})
    if result.returncode != 0:
        sys.exit(f"buildsim: evaluating {package} failed:\n{result.stderr}")
    record: dict[str, Any] = json.loads(result.stdout)
    return record


def store_paths(record: dict[str, Any]) -> set[str]:
    """Every stub store path the record's strings name (the top-level entry: <store>/<kind>/<name>...)."""
    pattern = re.compile(re.escape(record["storeDir"]) + r"/[^\s\"'$;:]+")

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return [text for item in items for text in strings(item)]

    return {path for text in strings(record) for path in pattern.findall(text)}


def wheels(record: dict[str, Any]) -> list[Wheel]:
    """The fetchPypi calls whose results package.nix uses."""
    prefix = record["storeDir"] + "/pypi/"
    found = []
    for path in sorted(store_paths(record)):
        if path.startswith(prefix):
            python, encoded, file = path[len(prefix) :].split("/")[:3]
            algorithm, _, digest = encoded.partition("-")
            sri = f"{algorithm}-{digest.replace('_', '/').replace('-', '+')}"
            found.append(Wheel(f"{prefix}{python}/{encoded}/{file}", python, sri, file))
    return found


def pytest_arguments(record: dict[str, Any]) -> list[str]:
    """pytestCheckHook's command-line arguments for what package.nix sets."""
    arguments = list(record["pytestFlags"])
    for flags in record["pytestFlagsArray"]:
        arguments += shlex.split(flags)
    if record["disabledTests"]:
        arguments += ["-k", " and ".join(f"not {test}" for test in record["disabledTests"])]
    if record["disabledTestMarks"]:
        arguments += ["-m", " and ".join(f"not {mark}" for mark in record["disabledTestMarks"])]
    for path in record["disabledTestPaths"]:
        arguments.append(f"--deselect={path}" if "::" in path else f"--ignore={path}")
    return arguments


def source_files(record: dict[str, Any]) -> list[str]:
    """The files of the `src` fileset, relative to its root; in a git checkout only tracked ones, as a flake sees."""
    root = Path(record["src"]["root"])
    named = [os.path.relpath(path, root) for path in record["src"]["paths"]]
    tracked = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", *named], capture_output=True)
    if tracked.returncode == 0:
        return [name for name in tracked.stdout.decode().split("\0") if name]
    files = []
    for name in named:
        path = root / name
        files += [os.path.relpath(p, root) for p in path.rglob("*") if p.is_file()] if path.is_dir() else [name]
    return files


def summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """The record with what is derived from it: source files, fetchPypi wheels, the check command, PATH."""
    return {
        **record,
        "sourceFiles": source_files(record),
        "fetchPypi": [wheel.__dict__ for wheel in wheels(record)],
        "pytestArguments": pytest_arguments(record),
        "checkPath": [
            f"{record['storeDir']}/pkgs/{i['attr']}/bin" for i in record["nativeCheckInputs"] if i["kind"] == "pkgs"
        ],
    }


def sri_of(path: Path) -> str:
    """The file's SRI sha256 hash, as fetchPypi's `hash`."""
    return "sha256-" + base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


def fetch_wheel(wheel: Wheel) -> Path:
    """The wheel from PyPI (cached; pip finds it as fetchPypi's URL does), checked against package.nix's hash."""
    cached = CACHE / "wheels" / wheel.file
    if not cached.is_file():
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest"]
        subprocess.run([*pip, str(cached.parent), *wheel.download_arguments()], check=True)
    if (found := sri_of(cached)) != wheel.hash:
        sys.exit(f"buildsim: hash mismatch for {wheel.file}: package.nix says {wheel.hash}, PyPI serves {found}")
    return cached


def pip_site(attrs: list[str], extra: tuple[str, ...] = ()) -> Path:
    """A site directory holding the PyPI builds of these nixpkgs attributes (cached by requirement list)."""
    requirements = sorted(
        {f"{INPUTS['python'][a]['pypi']}=={INPUTS['python'][a]['version']}" for a in attrs} | set(extra)
    )
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16]
    site = CACHE / "sites" / key
    if (site / ".complete").is_file():
        return site
    shutil.rmtree(site, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--only-binary=:all:", "--target", str(site)]
    subprocess.run([*pip, *requirements], check=True)
    keep_headless_opencv(site, pip)
    (site / ".complete").write_text("\n".join(requirements) + "\n")
    return site


def keep_headless_opencv(site: Path, pip: list[str]) -> None:
    """PyPI's rapidocr requires the GUI opencv-python, which writes the same cv2/ as opencv-python-headless.

    nixpkgs has one OpenCV (opencv4) for both, so keep only the headless build, as scripts/setup-venv does.
    """
    gui = list(site.glob("opencv_python-*.dist-info"))
    headless = list(site.glob("opencv_python_headless-*.dist-info"))
    if not gui or not headless:
        return
    for record_line in (gui[0] / "RECORD").read_text().splitlines():
        (site / record_line.split(",")[0]).unlink(missing_ok=True)
    shutil.rmtree(gui[0], ignore_errors=True)
    version = headless[0].name.removesuffix(".dist-info").split("-")[1]
    subprocess.run([*pip, "--no-deps", "--upgrade", f"opencv-python-headless=={version}"], check=True)


def python_attrs(inputs: list[dict[str, str]]) -> list[str]:
    """The nixpkgs attributes of the Python packages among these inputs."""
    return [i["attr"] for i in inputs if i["kind"] == "python3Packages"]


def realise(record: dict[str, Any], interpreter: str) -> dict[str, Path]:
    """Create every stub store path the build uses; return the site directories it runs with."""
    store = Path(record["storeDir"])
    subprocess.run([interpreter, "-m", "venv", "--without-pip", str(store / "python3")], check=True)
    for wheel in wheels(record):
        target = Path(wheel.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fetch_wheel(wheel), target)
    for attr, files in INPUTS["system"].items():
        for inside, host in files.items():
            found = shutil.which(host) or shutil.which(host, path="/usr/sbin:/sbin") or host
            if not Path(found).exists():
                sys.exit(f"buildsim: {attr}: {host} not found on this machine")
            (store / "pkgs" / attr / inside).parent.mkdir(parents=True, exist_ok=True)
            (store / "pkgs" / attr / inside).symlink_to(found)
    basic = store / "stdenv" / "bin"
    basic.mkdir(parents=True)
    for tool in BASIC_TOOLS:
        if found := shutil.which(tool):
            (basic / tool).symlink_to(found)
    return {
        "runtime": pip_site(python_attrs(record["dependencies"])),
        "check": pip_site(python_attrs(record["buildSystem"] + record["nativeCheckInputs"])),
        "tools": pip_site([], tuple(INPUTS["tools"])),
    }


def unpack(record: dict[str, Any], build: Path) -> Path:
    """unpackPhase: exactly the fileset's files, writable, in $NIX_BUILD_TOP/source."""
    root, source = Path(record["src"]["root"]), build / "source"
    for name in source_files(record):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    return source


def check_disabled_paths(record: dict[str, Any], source: Path) -> None:
    """pytestCheckHook refuses a disabledTestPaths entry that does not exist."""
    for path in record["disabledTestPaths"]:
        if not (source / path.split("::")[0]).exists():
            sys.exit(f"buildsim: disabled tests path {path} does not exist")


def relaxed(setting: bool | list[str]) -> str:
    """pythonRelaxDeps for builder.sh: `*` for every dependency, else the names, space-separated."""
    return "*" if setting is True else " ".join(setting or [])


def run_build(record: dict[str, Any], sites: dict[str, Path], build: Path, junit: Path) -> int:
    """builder.sh as `nobody`, in a network namespace of its own (loopback only), with nixpkgs' environment."""
    store = Path(record["storeDir"])
    path = [store / "stdenv" / "bin", store / "python3" / "bin", *map(Path, summary_of(record)["checkPath"])]
    environment = {
        "PATH": ":".join(map(str, path)),
        "PYTHONPATH": f"{sites['runtime']}:{sites['check']}",
        "HOME": "/homeless-shelter",
        "NIX_BUILD_TOP": str(build),
        "TMPDIR": str(build),
        "NIX_BUILD_CORES": str(os.cpu_count() or 1),
        "PYTHONNOUSERSITE": "1",
        "PYTHONHASHSEED": "0",
        "SOURCE_DATE_EPOCH": "315532800",
        "out": record["out"],
        "pythonVersion": record["pythonVersion"],
        "postPatch": record["postPatch"],
        "preCheck": record["preCheck"],
        "postCheck": record["postCheck"],
        "pythonImportsCheck": " ".join(record["pythonImportsCheck"]),
        "doCheck": "1" if record["doCheck"] else "",
        "pythonRelaxDeps": relaxed(record["pythonRelaxDeps"]),
        "buildsimTools": str(sites["tools"]),
    }
    if record["PYTEST_ADDOPTS"] is not None:
        environment["PYTEST_ADDOPTS"] = record["PYTEST_ADDOPTS"]
    # Reporting only: list failures and skips in the log, and per-test outcomes for the summary.
    arguments = [*pytest_arguments(record), "-rfEs", f"--junitxml={junit}"]
    user = f"--reuid={BUILDER_USER} --regid={BUILDER_USER} --clear-groups"
    shell = f'ip link set lo up && exec setpriv {user} env -i "$@"'
    builder = ["bash", str(build / "builder.sh"), *arguments]
    env_args = [f"{key}={value}" for key, value in environment.items()]
    command = ["unshare", "--net", "--", "sh", "-c", shell, "sh", *env_args, *builder]
    return subprocess.run(command, cwd=build).returncode


def outcomes(junit: Path) -> dict[str, Any]:
    """Test counts and per-test outcomes from pytest's JUnit XML."""
    per_test: dict[str, str] = {}
    if junit.is_file():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            per_test[name] = kinds[0] if kinds else "passed"
    counts = {kind: list(per_test.values()).count(kind) for kind in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "tests": per_test}


def simulate(arguments: argparse.Namespace) -> int:
    """The whole build: evaluate, realise, unpack, run the phases, summarise."""
    if os.geteuid() != 0:
        sys.exit("buildsim: run as root (it drops to nobody inside a fresh network namespace)")
    scratch = Path(tempfile.mkdtemp(prefix="immich-ml-buildsim-"))
    scratch.chmod(0o755)
    try:
        record = evaluate(arguments.package, find_lib(arguments.lib), scratch / "store")
        sites = realise(record, arguments.python)
        build = scratch / "build"
        source = unpack(record, build)
        check_disabled_paths(record, source)
        shutil.copy(HERE / "builder.sh", build / "builder.sh")
        out = Path(record["out"])
        out.mkdir()
        for owned in (build, out):
            subprocess.run(["chown", "-R", f"{BUILDER_USER}:{BUILDER_USER}", str(owned)], check=True)
        status = run_build(record, sites, build, build / "junit.xml")
        result = {"status": status, **outcomes(build / "junit.xml")}
        if arguments.summary:
            Path(arguments.summary).write_text(json.dumps(result, indent=1) + "\n")
        counts = result["counts"]
        print(f"buildsim: build {'succeeded' if status == 0 else 'FAILED'} (exit {status}); tests: {counts}")
        return status
    finally:
        if arguments.keep:
            print(f"buildsim: kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "fetch", "run"))
    parser.add_argument("--package", type=Path, default=REPO / "nix" / "package.nix")
    parser.add_argument("--lib", help="nixpkgs lib folder (default $NIXPKGS_LIB, else nix/stand-in)")
    parser.add_argument("--store", default="/buildsim-store", help="record: the stub store's prefix")
    parser.add_argument("--python", default="/usr/bin/python3.11", help="run: the bare interpreter")
    parser.add_argument("--summary", help="run: write the exit status, counts and per-test outcomes here (JSON)")
    parser.add_argument("--keep", action="store_true", help="run: keep the scratch store and build folder")
    arguments = parser.parse_args()
    if arguments.action == "record":
        record = evaluate(arguments.package, find_lib(arguments.lib), Path(arguments.store))
        print(json.dumps(summary_of(record), indent=1))
        return 0
    if arguments.action == "fetch":
        for wheel in wheels(evaluate(arguments.package, find_lib(arguments.lib), Path(arguments.store))):
            print(f"{fetch_wheel(wheel)}: {wheel.hash}")
        return 0
    return simulate(arguments)


if __name__ == "__main__":
    sys.exit(main())
