"""Our nixpkgs `lib` stand-in (nix/stand-in), with which CI evaluates nix/: it has every `lib` name that
nix/ and flake.nix use, and nix/eval-test.sh refuses a nix/ that changed since it was last compared with
nixpkgs' lib."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAND_IN = ROOT / "nix" / "stand-in"

_NAME = r"[A-Za-z_][\w'-]*"
# lib.a.b and, for `inherit (lib) types`, types.a.b (no other `types` exists under nix/).
_DOTTED = re.compile(rf"(?<![\w.'-])(?:pkgs\.)?(lib|types)((?:\.{_NAME})+)")
_INHERIT = re.compile(rf"inherit\s*\(\s*lib((?:\.{_NAME})*)\s*\)([^;]*);")
_WITH = re.compile(rf"(?<![\w.'-])with\s+lib((?:\.{_NAME})*)\s*;")
_COMMENT = re.compile(r"(^|\s)#.*$", re.MULTILINE)

# Walks each path into the stand-in; a path stops being checked where it reaches a non-set (a
# function's result is not the stand-in's business).
_MISSING = """
{ standIn, uses }:
let
  lib = import standIn;
  present = value: path:
    path == [ ] || !builtins.isAttrs value
    || (value ? ${builtins.head path} && present value.${builtins.head path} (builtins.tail path));
in
builtins.filter (path: !present lib path) (builtins.fromJSON uses)
"""

Uses = dict[tuple[str, ...], list[str]]


def _nix_files(root: Path) -> list[Path]:
    files = [path for path in (root / "nix").rglob("*.nix") if STAND_IN.name not in path.relative_to(root).parts]
    return sorted([*files, root / "flake.nix"])


def lib_uses(root: Path) -> tuple[Uses, list[str]]:
    """Every `lib` attribute path used under root's nix/ and flake.nix, with where, and the `with lib;` uses."""
    uses: Uses = defaultdict(list)
    opaque: list[str] = []
    for path in _nix_files(root):
        text = _COMMENT.sub(r"\1", path.read_text())
        where = path.relative_to(root)
        for match in _DOTTED.finditer(text):
            head = () if match[1] == "lib" else ("types",)
            uses[(*head, *match[2].split(".")[1:])].append(f"{where}:{text.count(chr(10), 0, match.start()) + 1}")
        for match in _INHERIT.finditer(text):
            for name in match[2].split():
                uses[(*match[1].split(".")[1:], name)].append(f"{where} (inherit)")
        opaque += [f"{where}: with lib{match[1]};" for match in _WITH.finditer(text)]
    return dict(uses), opaque


def _tool(name: str, why: str) -> str:
    """The program's path; skips without it, fails instead where IMMICH_ML_REQUIRE_NIX=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("IMMICH_ML_REQUIRE_NIX") == "1":
            pytest.fail(f"{name} is missing and IMMICH_ML_REQUIRE_NIX=1: {why}")
        pytest.skip(f"{name} is missing: {why}")
    return path


def missing_from_stand_in(uses: Uses) -> list[str]:
    """The used paths the stand-in lacks, each with where it is used."""
    nix = _tool("nix-instantiate", "apt-get install nix-bin (.ci/run does)")
    paths = sorted(uses)
    result = subprocess.run(
        [nix, "--store", "dummy://", "--eval", "--strict", "--json", "-E", _MISSING]
        + ["--argstr", "standIn", str(STAND_IN), "--argstr", "uses", json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [f"lib.{'.'.join(path)} ({', '.join(uses[tuple(path)])})" for path in json.loads(result.stdout)]


@pytest.fixture
def source_tree() -> Path:
    """The checkout's nix/ (absent from the package build's source, which needs no stand-in)."""
    if not (ROOT / "nix" / "module.nix").is_file():
        pytest.skip("nix/ is not in this source tree (the package build's source has no nix/)")
    return ROOT


def test_the_stand_in_has_every_lib_name_nix_uses(source_tree: Path) -> None:
    uses, opaque = lib_uses(source_tree)
    assert opaque == [], "`with lib;` hides which names are used: write lib.<name> or inherit (lib) <name>"
    assert {("mkIf",), ("evalModules",), ("types", "submodule"), ("fileset", "toSource")} <= uses.keys()
    assert missing_from_stand_in(uses) == []


def test_an_unknown_lib_name_is_reported(source_tree: Path, tmp_path: Path) -> None:
    shutil.copytree(source_tree / "nix", tmp_path / "nix")
    shutil.copy(source_tree / "flake.nix", tmp_path / "flake.nix")
    module = tmp_path / "nix" / "module.nix"
    text = module.read_text()
    shouting_line = text[: text.index("let\n")].count("\n") + 2
    module.write_text(text.replace("let\n", 'let\n  shouted = lib.toShouting "x";\n', 1))
    (tmp_path / "nix" / "extra.nix").write_text(
        "{ lib }:\n"
        "let\n"
        "  inherit (lib) mkOption unknownHelper;\n"
        "  inherit (lib.types) str unknownType;\n"
        "in\n"
        "# lib.onlyInAComment is not a use\n"
        "{ a = mkOption { type = lib.types.attrsOf types.unknownNested; }; b = lib.fileset.unknownSet; }\n"
    )
    uses, _ = lib_uses(tmp_path)
    assert ("onlyInAComment",) not in uses
    assert missing_from_stand_in(uses) == [
        "lib.fileset.unknownSet (nix/extra.nix:7)",
        f"lib.toShouting (nix/module.nix:{shouting_line})",
        "lib.types.unknownNested (nix/extra.nix:7)",
        "lib.types.unknownType (nix/extra.nix (inherit))",
        "lib.unknownHelper (nix/extra.nix (inherit))",
    ]


def test_with_lib_is_reported(source_tree: Path, tmp_path: Path) -> None:
    shutil.copytree(source_tree / "nix", tmp_path / "nix")
    shutil.copy(source_tree / "flake.nix", tmp_path / "flake.nix")
    (tmp_path / "nix" / "opaque.nix").write_text("{ lib }: with lib; { a = mkIf true 1; }\n")
    assert lib_uses(tmp_path)[1] == ["nix/opaque.nix: with lib;"]


def _eval_test(root: Path, *library: str) -> subprocess.CompletedProcess[str]:
    _tool("nix-instantiate", "apt-get install nix-bin (.ci/run does)")
    git = _tool("git", "the record's hashes cover the files git lists")
    subprocess.run([git, "init", "-q", str(root)], check=True)
    environment = {"PATH": os.environ["PATH"], "HOME": str(root)}
    return subprocess.run(
        ["bash", str(root / "nix" / "eval-test.sh"), *library],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def test_eval_test_fails_once_nix_changes_after_the_record(source_tree: Path, tmp_path: Path) -> None:
    """CI evaluates with the stand-in only, so it insists that nix/ is what was last compared with nixpkgs' lib."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    shutil.copytree(source_tree / "nix", copy / "nix")
    shutil.copy(source_tree / "flake.nix", copy / "flake.nix")
    shutil.copy(source_tree / "pyproject.toml", copy / "pyproject.toml")  # package.nix reads it
    (copy / "service").symlink_to(source_tree / "service")  # eval.nix checks pythonImportsCheck's modules
    record = copy / "nix" / "stand-in" / "checked-against-real-lib"
    record.unlink()

    unrecorded = _eval_test(copy)
    assert unrecorded.returncode == 1
    assert "nix/ changed since the stand-in was last checked" in unrecorded.stderr
    assert "nix/eval-test.sh /path/to/nixpkgs.lib" in unrecorded.stderr

    # The stand-in, given as the library, agrees with itself: that writes a record as nixpkgs' lib would.
    recorded = _eval_test(copy, str(copy / "nix" / "stand-in"))
    assert recorded.returncode == 0, recorded.stderr
    assert "  nix/module.nix\n" in record.read_text()
    agreed = _eval_test(copy)
    assert agreed.returncode == 0, agreed.stderr
    assert "evaluation checks passed" in agreed.stdout

    module = copy / "nix" / "module.nix"
    module.write_text(module.read_text() + "# an edit after the record\n")
    (copy / "nix" / "socket.nix").write_text("{ }\n")
    changed = _eval_test(copy)
    assert changed.returncode == 1
    assert "  changed: nix/module.nix\n  new: nix/socket.nix\n" in changed.stderr
