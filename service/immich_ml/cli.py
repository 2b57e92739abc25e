"""`immich-ml serve`, `immich-ml models list|pull|import|remove` and `immich-ml systemd install`."""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import textwrap
from collections.abc import Sequence
from pathlib import Path

from immich_ml import __version__
from immich_ml.daemon import unit_files
from immich_ml.errors import ConfigError, ImmichMLError, UnknownModel
from immich_ml.log import setup_logging
from immich_ml.models.catalog import clean_name, is_known, known_names, task_of
from immich_ml.models.progress import TerminalBar, Transfers
from immich_ml.models.store import ModelStore
from immich_ml.models.tasks import TASK_TYPES, ModelKey, ModelType, Task
from immich_ml.settings import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="immich-ml", description="Machine-learning backend for Immich.")
    parser.add_argument("--version", action="version", version=f"immich-ml {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon (settings from the environment)")
    serve.add_argument("--host", help="address to bind (overrides IMMICH_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (overrides IMMICH_PORT; default 3003)")

    models = commands.add_parser("models", help="manage the model cache (for air-gapped hosts too)")
    models.add_argument("--cache", type=Path, help="cache folder (overrides MACHINE_LEARNING_CACHE_FOLDER)")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show cached models and their sizes")
    pull = actions.add_parser("pull", help="download a model into the cache")
    pull.add_argument("name", help="model name, e.g. ViT-B-32__openai, buffalo_l, PP-OCRv5_mobile")
    pull.add_argument("--task", choices=[t.value for t in Task], help="task (guessed from the name if unset)")
    pull.add_argument(
        "--type",
        dest="model_type",
        choices=[t.value for t in ModelType],
        help="only this model type (default: all types of the task)",
    )
    imp = actions.add_parser("import", help="copy models from a folder or tar archive in cache layout")
    imp.add_argument("source", type=Path)
    remove = actions.add_parser("remove", help="delete a model from the cache")
    remove.add_argument("name")
    remove.add_argument("--task", choices=[t.value for t in Task], help="task (default: every task)")

    systemd = commands.add_parser("systemd", help="run immich-ml as a systemd service on any distribution")
    units = systemd.add_subparsers(dest="action", required=True)
    install = units.add_parser("install", help="write the unit, the system user's sysusers.d file and settings")
    install.add_argument(
        "--gpu", action="store_true", help="add the NVIDIA drop-in (devices, CUDA, nvidia_uvm loaded at start)"
    )
    install.add_argument("--root", type=Path, default=Path("/"), help="write under this folder (default: /)")
    install.add_argument(
        "--executable",
        type=Path,
        default=_installed_program(),
        help="the program ExecStart runs (default: %(default)s)",
    )
    install.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    return parser


def _installed_program() -> Path:
    """This installation's `immich-ml` (the scripts folder of the running Python), else the one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "immich-ml"
    found = beside if beside.is_file() else shutil.which("immich-ml")
    return Path(found) if found else beside


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `immich-ml` command."""
    args = _parser().parse_args(argv)
    if args.command == "systemd":
        return _systemd_install(args.executable, args.root, gpu=args.gpu, dry_run=args.dry_run)
    try:
        settings = Settings.from_env().with_overrides(
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            cache_folder=getattr(args, "cache", None),
        )
    except ConfigError as error:
        print(f"immich-ml: configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, no_color=settings.no_color)
    if args.command == "serve":
        from immich_ml.daemon.server import run

        return run(settings)
    # On a terminal a bar redrawn in place; otherwise (a pipe, a file, the journal) the store's log lines.
    transfers = Transfers([TerminalBar(sys.stderr)]) if sys.stderr.isatty() else None
    return _models(args, ModelStore(settings, transfers))


def _models(args: argparse.Namespace, store: ModelStore) -> int:
    try:
        if args.action == "list":
            return _list(store)
        if args.action == "pull":
            return _pull(store, args.name, args.task, args.model_type)
        if args.action == "import":
            for target in store.import_models(args.source):
                print(f"imported {target}")
            return 0
        tasks = [Task(args.task)] if args.task else list(Task)
        removed = [task for task in tasks if store.remove(task, clean_name(args.name))]
        if not removed:
            print(f"{args.name} is not in {store.root}", file=sys.stderr)
            return 1
        for task in removed:
            print(f"removed {task}/{clean_name(args.name)}")
        return 0
    except (ImmichMLError, ValueError, OSError) as error:
        print(f"immich-ml: {error}", file=sys.stderr)
        return 1


def _list(store: ModelStore) -> int:
    models = store.cached()
    if not models:
        print(f"no models in {store.root}")
        return 0
    print(f"{'TASK':<20} {'MODEL':<45} {'TYPE':<12} {'SIZE':>10}")
    for model in models:
        print(f"{model.task:<20} {model.name:<45} {model.type:<12} {model.size_bytes / 1024**2:>8.1f} MiB")
    return 0


def _pull(store: ModelStore, name: str, task_name: str | None, type_name: str | None) -> int:
    task = Task(task_name) if task_name else task_of(clean_name(name))
    types = [ModelType(type_name)] if type_name else TASK_TYPES[task]
    keys = [ModelKey(task, model_type, clean_name(name)) for model_type in types]
    if not all(is_known(key) or store.is_cached(key) for key in keys):
        raise UnknownModel(f"unknown model '{name}' (the server would refuse it too). Known models:\n{_known()}")
    for key in keys:
        print(f"{key}: {store.ensure(key)}")
    return 0


def _known() -> str:
    return "\n".join(
        textwrap.fill(
            " ".join(known_names(task)),
            width=110,
            initial_indent=f"  {task}: ",
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        for task in Task
    )


def _systemd_install(executable: Path, root: Path, *, gpu: bool, dry_run: bool) -> int:
    if not executable.is_file():
        print(f"immich-ml: {executable} does not exist; name the installed program with --executable", file=sys.stderr)
        return 1
    try:
        files = unit_files.render(executable, gpu=gpu)
    except unit_files.UnitError as error:
        print(f"immich-ml: {error}", file=sys.stderr)
        return 1
    if dry_run:
        for relative, text in unit_files.planned(files, root).items():
            print(f"# {root / relative}\n{text}")
        if (root / unit_files.ENV_FILE).exists():
            print(f"# {root / unit_files.ENV_FILE} exists: kept as it is")
        return 0
    for path in unit_files.install(files, root):
        print(f"wrote {path}")
    if root == Path("/"):
        print(
            "next: systemd-sysusers /etc/sysusers.d/immich-ml.conf && systemctl daemon-reload && "
            "systemctl enable --now immich-ml.socket immich-ml.service"
            + (" (and modprobe nvidia_uvm once)" if gpu else "")
        )
    return 0
