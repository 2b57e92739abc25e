"""The systemd files for hosts that are not NixOS: systemd's own parser accepts them, and they carry what the
NixOS module's unit has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from immich_ml.cli import main as cli_main
from immich_ml.daemon import unit_files
from tests.conftest import installed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def executable(tmp_path: Path) -> Path:
    """The installed `immich-ml`, reached through a path outside home directories (ProtectHome)."""
    link = tmp_path / "opt" / "bin" / "immich-ml"
    link.parent.mkdir(parents=True)
    link.symlink_to(installed("immich-ml"))
    return link


def _verify(root: Path, unit: PurePosixPath = unit_files.UNIT) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (apt-get install systemd; .ci/run does)")
    return subprocess.run([analyze, "verify", str(root / unit)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_systemd_analyze_verify_accepts_the_unit_and_drop_in(tmp_path: Path, executable: Path, gpu: bool) -> None:
    root = tmp_path / "root"
    written = unit_files.install(unit_files.render(executable, gpu=gpu), root)
    assert (root / unit_files.GPU_DROP_IN in written) is gpu
    result = _verify(root)
    # verify exits 0 on unknown keys and unparsable values, and only warns: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_service_is_bound_to_a_socket_unit_that_holds_the_port(tmp_path: Path, executable: Path) -> None:
    root = tmp_path / "root"
    unit_files.install(unit_files.render(executable), root)
    socket_unit, service = (root / unit_files.SOCKET).read_text(), (root / unit_files.UNIT).read_text()
    assert re.search(r"^ListenStream=3003$", socket_unit, re.MULTILINE)
    assert re.search(r"^Backlog=128$", socket_unit, re.MULTILINE)  # what the daemon listens with, too
    assert re.search(r"^Requires=immich-ml.socket$", service, re.MULTILINE)
    result = _verify(root, unit_files.SOCKET)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_catches_a_broken_drop_in(tmp_path: Path, executable: Path) -> None:
    """The check above can fail: systemd reads the drop-in next to the unit and complains about it."""
    root = tmp_path / "root"
    unit_files.install(unit_files.render(executable, gpu=True), root)
    drop_in = root / unit_files.GPU_DROP_IN
    drop_in.write_text(drop_in.read_text().replace("LimitMEMLOCK=infinity", "LimitMEMLOK=infinity"))
    assert "Unknown key 'LimitMEMLOK'" in _verify(root).stderr


def test_the_unit_has_the_nixos_modules_service_settings(executable: Path) -> None:
    """Every directive of the module's serviceConfig is in the unit or the drop-in, except those that only
    exist for module options (TLS credentials, the systemd IP filter, the cache path)."""
    module = (ROOT / "nix" / "module.nix").read_text()
    service_config = module[module.index("serviceConfig = ") : module.index("SystemCallErrorNumber")]
    directives = set(re.findall(r"^\s+([A-Z][A-Za-z]+) =", service_config, re.MULTILINE))
    option_only = {"LoadCredential", "IPAddressDeny", "IPAddressAllow", "ReadWritePaths"}
    files = unit_files.render(executable, gpu=True)
    text = files[unit_files.UNIT] + files[unit_files.GPU_DROP_IN]
    present = set(re.findall(r"^([A-Z][A-Za-z]+)=", text, re.MULTILINE))
    assert len(directives) > 30
    assert directives - option_only - present == set()


def test_exec_start_is_the_given_program_quoted_for_systemd(tmp_path: Path) -> None:
    program = tmp_path / "odd dir 100%" / "immich-ml"
    unit = unit_files.render(program)[unit_files.UNIT]
    assert f'ExecStart="{str(program).replace("%", "%%")}" serve' in unit.splitlines()


@pytest.mark.parametrize("program", ["/home/ann/immich-ml/.venv/bin/immich-ml", "/root/.venv/bin/immich-ml"])
def test_a_program_in_a_home_directory_is_refused_with_the_fix(program: str) -> None:
    with pytest.raises(unit_files.UnitError, match="ProtectHome=yes hides .* /opt/immich-ml"):
        unit_files.render(Path(program))


def test_install_keeps_the_operators_settings_file(tmp_path: Path, executable: Path) -> None:
    settings = tmp_path / unit_files.ENV_FILE
    settings.parent.mkdir(parents=True)
    settings.write_text("IMMICH_HOST=172.17.0.1\n")
    written = unit_files.install(unit_files.render(executable), tmp_path)
    assert settings not in written
    assert settings.read_text() == "IMMICH_HOST=172.17.0.1\n"
    assert (tmp_path / unit_files.UNIT) in written


def test_systemd_install_writes_files_whose_exec_start_is_the_program(
    tmp_path: Path, executable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    args = ["systemd", "install", "--root", str(root), "--executable", str(executable), "--gpu"]
    assert cli_main([*args, "--dry-run"]) == 0
    assert not root.exists()
    assert f"ExecStart={executable} serve" in capsys.readouterr().out.splitlines()
    assert cli_main(args) == 0
    assert f"ExecStart={executable} serve" in (root / unit_files.UNIT).read_text().splitlines()
    assert (root / unit_files.GPU_DROP_IN).is_file() and (root / unit_files.SYSUSERS).is_file()
    assert _verify(root).stderr == ""


def _dry_run_files(output: str, root: Path) -> dict[Path, str]:
    """The files a dry run prints: each after its `# <root>/<path>` heading."""
    files: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines(keepends=True):
        if line.startswith(f"# {root}/") and not line.rstrip().endswith("kept as it is"):
            current = Path(line[2:].rstrip("\n"))
            files[current] = ""
        elif current is not None:
            files[current] += line
    return {path: text.removesuffix("\n") for path, text in files.items()}  # print's own newline


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_dry_run_prints_exactly_the_files_an_install_writes(
    tmp_path: Path, executable: Path, capsys: pytest.CaptureFixture[str], gpu: bool
) -> None:
    """The settings file included (written only while there is none), and the unit's provider: cpu without
    --gpu (PrivateDevices hides the GPU), cuda with it (docs/operations.md)."""
    root = tmp_path / "root"
    args = ["systemd", "install", "--root", str(root), "--executable", str(executable)] + (["--gpu"] if gpu else [])
    assert cli_main([*args, "--dry-run"]) == 0
    printed = _dry_run_files(capsys.readouterr().out, root)
    assert cli_main(args) == 0
    written = {path: path.read_text() for path in root.rglob("*") if path.is_file()}
    assert printed == written
    assert "Environment=MACHINE_LEARNING_PROVIDER=cpu\n" in written[root / unit_files.UNIT]
    assert ("Environment=MACHINE_LEARNING_PROVIDER=cuda\n" in written.get(root / unit_files.GPU_DROP_IN, "")) == gpu

    (root / unit_files.ENV_FILE).write_text("IMMICH_HOST=172.17.0.1\n")
    capsys.readouterr()
    assert cli_main([*args, "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert root / unit_files.ENV_FILE not in _dry_run_files(output, root)
    assert f"# {root / unit_files.ENV_FILE} exists: kept as it is" in output.splitlines()


def test_systemd_install_defaults_to_this_installations_program(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["systemd", "install", "--dry-run", "--executable", "/nowhere/immich-ml"]) == 1
    assert "/nowhere/immich-ml does not exist" in capsys.readouterr().err
    program = installed("immich-ml")
    result = subprocess.run(
        [program, "systemd", "install", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "1000"},  # argparse would wrap a long path at its hyphens
    )
    assert f"(default: {program})" in " ".join(result.stdout.split())
