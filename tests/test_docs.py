"""The README and docs/ against the code: variable names, commands, repository paths and links.

Fails when a page names a variable that neither the daemon nor the test suite reads (or the configuration
reference misses one the daemon reads), a command or flag the CLI does not have, a script or file that is not
in the repository, or a link to a page or heading that does not exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from immich_ml.settings import variable_names
from tests.conftest import installed

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
REFERENCE = ROOT / "docs" / "configuration.md"

# Files the docs tell someone to create (the GPU validation run's results, docs/gpu.md).
TO_BE_WRITTEN = {"docs/benchmark-cuda.json", "docs/benchmark-cuda.png"}

# Variables of the Immich server (not read by immich-ml) and upstream variables the docs name as unused.
NOT_OURS = {"IMMICH_MACHINE_LEARNING_URL", "IMMICH_MACHINE_LEARNING_ENABLED", "MACHINE_LEARNING_WORKER_TIMEOUT"}

_VARIABLE = re.compile(r"\b(?:MACHINE_LEARNING|IMMICH)_[A-Z0-9_]*[A-Z0-9]\b|…(?:__[A-Z0-9_]*[A-Z0-9])")
_CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:\./)?(?:scripts|tests|nix|docs|service|\.ci)/[\w./-]*[\w])")


def _variables(text: str) -> set[str]:
    """Variable names in `text`; `…__X__Y` after a full name replaces as many of its last segments."""
    found: set[str] = set()
    previous = ""
    for name in _VARIABLE.findall(text):
        if name.startswith("…"):
            tail = name[1:].split("__")[1:]
            head = previous.split("__")[: -len(tail)]
            name = "__".join([*head, *tail])
        found.add(name)
        previous = name
    return found


def _code(text: str) -> list[str]:
    """The contents of fenced blocks and inline code spans, shell comments removed."""
    return [re.sub(r"(^|\s)#.*", "", block or span) for block, span in _CODE.findall(text)]


def _source_mentions(name: str) -> bool:
    """Whether code outside Settings reads `name`: immich-gpu-check, or the test suite (its own knobs)."""
    sources = [
        *(ROOT / "service").rglob("*.py"),
        *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py"),
    ]
    return any(name in path.read_text() for path in sources)


def test_every_variable_in_the_docs_is_read_by_the_daemon() -> None:
    read = set(variable_names())
    unknown = {}
    for page in PAGES:
        for name in _variables(page.read_text()) - read - NOT_OURS:
            if not _source_mentions(name):
                unknown.setdefault(name, page.relative_to(ROOT).as_posix())
    assert unknown == {}


def test_the_configuration_reference_lists_every_variable_the_daemon_reads() -> None:
    text = REFERENCE.read_text()
    documented = _variables(text) | set(re.findall(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b", text))  # HF_ENDPOINT, NO_COLOR
    missing = [name for name in variable_names() if name not in documented]
    assert missing == []


def test_the_variable_list_comes_from_the_settings_reader() -> None:
    """The check above can fail: `variable_names` is what `Settings.from_env` asks for, not a copy of the docs."""
    names = variable_names()
    assert "IMMICH_HOST" in names and "MACHINE_LEARNING_PRELOAD__OCR__RECOGNITION" in names
    assert len(names) == len(set(names)) > 50
    assert "MACHINE_LEARNING_NOT_A_SETTING" not in names


def _commands(prefix: str) -> set[tuple[str, ...]]:
    """Subcommand paths and flags after `prefix` in the docs' code: ("models", "pull") or ("models", "--cache")."""
    found = set()
    # A command line: the program first (perhaps through sudo, env or a path), not prose in sample output.
    pattern = re.compile(
        rf"^\s*(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:env\s+(?:\w+=\S+\s+)*)?(?:\S*/)?"
        rf"{re.escape(prefix)} ([^\n|;&]*)",
        re.MULTILINE,
    )
    for page in PAGES:
        for code in _code(page.read_text()):
            for arguments in pattern.findall(code):
                words = arguments.split()
                if words[:1] == ["--"]:
                    continue  # `nix run …/immich-ml -- --port 3004`: the flake app's arguments
                path = tuple(_prefix_words(words))
                found.add(path)
                found.update((*path, flag) for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", arguments))
    return found


def _prefix_words(words: list[str]) -> list[str]:
    taken = []
    for word in words:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        taken.append(word)
    return taken


@pytest.mark.parametrize("program", ["immich-ml", "immich-gpu-check"])
def test_every_documented_command_and_flag_exists(program: str) -> None:
    executable = installed(program)
    commands = _commands(program)
    assert commands, f"no {program} command found in the docs"
    missing = []
    for command in sorted(commands):
        words = [w for w in command if not w.startswith("--")]
        flag = command[-1] if command and command[-1].startswith("--") else None
        result = subprocess.run([executable, *words, "--help"], capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or (flag is not None and flag not in result.stdout):
            missing.append(" ".join([program, *command]))
    assert missing == []


def test_the_command_check_can_fail() -> None:
    result = subprocess.run(
        [installed("immich-ml"), "models", "frobnicate", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


def test_every_repository_path_in_the_docs_exists() -> None:
    missing = set()
    for page in PAGES:
        for code in _code(page.read_text()):
            for match in _REPO_PATH.finditer(code):
                path = match.group(1)
                if re.search(r"(--json|>)\s*$", code[: match.start()]):
                    continue  # a file the command writes
                if path not in TO_BE_WRITTEN and not (ROOT / path).exists():
                    missing.add(f"{page.relative_to(ROOT)}: {path}")
    assert missing == set()


def test_documented_scripts_are_executable() -> None:
    scripts = {
        path
        for page in PAGES
        for code in _code(page.read_text())
        for path in re.findall(r"(?<![\w/.-])(?:\./)?(scripts/[\w-]+)(?![\w./-])", code)
    }
    assert {"scripts/serve", "scripts/test"} <= scripts
    assert [s for s in sorted(scripts) if not (ROOT / s).stat().st_mode & 0o111] == []


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_link_to_a_page_or_heading_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
