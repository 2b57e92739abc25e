"""Take over a model cache that an earlier image filled as root, before privileges are dropped."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["take_ownership"]


def take_ownership(root: Path, uid: int, gid: int) -> int:
    """Make `root` and everything under it owned by `uid`:`gid` (creating `root` if missing); return how many
    entries changed owner. Symbolic links are changed themselves, never followed."""
    root.mkdir(parents=True, exist_ok=True)
    changed = 0
    for folder, dirs, files in os.walk(root):  # entered folders come as `folder`; links to folders stay in `dirs`
        links = [name for name in dirs if os.path.islink(os.path.join(folder, name))]
        for path in [folder, *(os.path.join(folder, name) for name in files + links)]:
            stat = os.lstat(path)
            if (stat.st_uid, stat.st_gid) != (uid, gid):
                os.lchown(path, uid, gid)
                changed += 1
    return changed
