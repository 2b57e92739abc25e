"""`immich-gpu-check`: validate an NVIDIA setup for immich-ml end to end and say how to fix what is wrong."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from immich_ml.gpu_check.api_check import check_api
from immich_ml.gpu_check.archs import parse_archs
from immich_ml.gpu_check.context import Context, Options
from immich_ml.gpu_check.host_checks import (
    check_cdi,
    check_driver,
    check_journal,
    check_memory,
    check_modules,
    check_service,
)
from immich_ml.gpu_check.report import render_json, render_table
from immich_ml.gpu_check.results import Check, Result, Status
from immich_ml.gpu_check.runtime_checks import check_arch, check_providers, check_throughput

__all__ = ["CHECKS", "main", "run_checks"]

CHECKS: tuple[Check, ...] = (
    Check("driver", "NVIDIA driver and GPUs (NVML)", check_driver),
    Check("modules", "kernel modules and device nodes", check_modules),
    Check("cdi", "container toolkit CDI generator and spec", check_cdi),
    Check("service", "immich-ml systemd unit", check_service),
    Check("providers", "onnxruntime build and a real GPU inference", check_providers),
    Check("journal", "providers the service logged since it started", check_journal),
    Check("memory", "GPU memory used by the service", check_memory),
    Check("api", "ML API: /ping, /health, /predict", check_api),
    Check("arch", "compute capability vs the build's architectures", check_arch),
    Check("throughput", "GPU throughput probe", check_throughput),
)
_NAMES = tuple(check.name for check in CHECKS)
ARCHS_ENV = "IMMICH_GPU_CHECK_CUDA_ARCHS"


def run_checks(options: Options, selected: Sequence[str]) -> list[tuple[Check, Result]]:
    """Run every check in order; those not in `selected` are reported as skipped on request."""
    context = Context(options)
    try:
        return [
            (check, check.run(context) if check.name in selected else Result.skipped("skipped on request"))
            for check in CHECKS
        ]
    finally:
        context.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when no check failed, 1 when one did, 2 for a usage error."""
    args = _parser().parse_args(argv)
    try:
        archs = parse_archs(args.cuda_archs) if args.cuda_archs else None
    except ValueError as error:
        _parser().error(f"--cuda-archs: {error}")
    options = Options(
        url=args.url,
        model=args.model,
        unit=args.unit,
        root=args.root,
        cuda_archs=archs,
        probe_seconds=args.probe_seconds,
        timeout_s=args.timeout,
    )
    rows = run_checks(options, _selected(args))
    if args.json:
        print(render_json(rows, url=options.url))
    else:
        print(render_table(rows, colour=sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    return 1 if any(result.status is Status.FAIL for _, result in rows) else 0


def _selected(args: argparse.Namespace) -> list[str]:
    only = args.only or list(_NAMES)
    return [name for name in only if name not in set(args.skip or ())]


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in names if name not in _NAMES]:
        raise argparse.ArgumentTypeError(f"unknown check(s) {', '.join(unknown)}; checks: {', '.join(_NAMES)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="immich-gpu-check",
        description="Check that immich-ml really runs on the NVIDIA GPU: driver, kernel modules, CDI, the "
        "systemd unit, onnxruntime providers, VRAM, the HTTP API, architectures, throughput.",
        epilog=f"checks, in order: {', '.join(_NAMES)}. Exit status: 0 when none failed, 1 otherwise.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:3003", help="the ML service (default: %(default)s)")
    parser.add_argument(
        "--model", help="CLIP model for the /predict check (default: the one /health lists, else ViT-B-32__openai)"
    )
    parser.add_argument("--unit", default="immich-ml.service", help="systemd unit (default: %(default)s)")
    parser.add_argument("--skip", type=_names, metavar="NAME,...", help="checks to leave out")
    parser.add_argument("--only", type=_names, metavar="NAME,...", help="run only these checks")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--cuda-archs",
        default=os.environ.get(ARCHS_ENV),
        metavar="LIST",
        help=f"architectures the onnxruntime build carries, e.g. '7.5;8.6' (default: "
        f"${ARCHS_ENV}, else the table for official wheels)",
    )
    parser.add_argument("--probe-seconds", type=float, default=2.0, help="throughput probe length")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="HTTP timeout in seconds (a first /predict may load the model)"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="filesystem root for /proc, /dev, /run and /etc (for tests and chroots)",
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
