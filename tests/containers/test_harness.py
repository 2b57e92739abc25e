"""The container harness itself: the shared images boot systemd as PID 1, commands pass or fail as they
should, and the runner leaves nothing behind (after printing what a failed test needs)."""

from __future__ import annotations

import os
import resource

import pytest

from tests.containers import base
from tests.containers.machine import Machine
from tests.containers.podman import REQUIRE_ENV, CommandError, Podman, skip_or_fail, unusable_reason


def test_systemd_boots_as_pid_1_with_the_hosts_file_limit(podman: Podman, systemd_image: str) -> None:
    machine = Machine.boot(podman, systemd_image)
    assert machine.succeed("cat", "/proc/1/comm").strip() == "systemd"
    assert machine.failed_units() == []
    machine.wait_for_unit("multi-user.target")
    # containers.conf's nofile limit reaches the container (runc cannot raise it past the host's hard limit).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert machine.succeed("prlimit", "--nofile", "--output=HARD", "--noheadings", "--pid=1").strip() == str(hard)


def test_succeed_and_fail_report_the_commands_output(podman: Podman, debian_image: str) -> None:
    container = podman.run(debian_image, "sleep", "infinity")
    assert container.succeed("echo", "hello") == "hello\n"
    assert "No such file" in container.fail("ls", "/nowhere")
    with pytest.raises(CommandError, match="No such file"):
        container.succeed("ls", "/nowhere")
    with pytest.raises(CommandError, match="succeeded but should have failed"):
        container.fail("true")


def test_cleanup_prints_the_logs_then_removes_every_container(
    podman: Podman, debian_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    container = podman.run(debian_image, "echo", "started-and-logged")
    podman("wait", container.id)  # exited: its log is complete
    podman.cleanup(dump_logs=True)
    assert "started-and-logged" in capsys.readouterr().out
    assert podman("container", "exists", container.id, check=False).returncode == 1


def test_an_image_is_tagged_by_its_inputs() -> None:
    assert base.input_tag(["a", ["x", "y"]]) == base.input_tag(["a", ["x", "y"]])
    assert base.input_tag(["a", ["x", "y"]]) != base.input_tag(["a", ["x", "z"]])


def test_without_root_the_tests_skip_locally_and_fail_where_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = unusable_reason()
    assert reason is not None and "as root" in reason
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="as root"):
        skip_or_fail(reason)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"required \\({REQUIRE_ENV}=1\\) but cannot run"):
        skip_or_fail(reason)
