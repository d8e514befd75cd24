"""The one disk rule for the weights cache: does a model's download fit FARLABS_MAX_DISK_SPACE and the disk?

`farworker check` asks it before anything is downloaded, with the catalogue's size of the model; `farworker run`
asks it before the first byte is written, with the sizes the hub lists. Same rule, same words: the two cannot
disagree about the same disk.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

FREE_SPACE_RESERVE = 256 * 2**20  # never fill the cache's disk to the last byte


@dataclass(frozen=True)
class CacheDisk:
    """What the rule needs to know of the cache's disk."""

    free: int  # bytes free on the cache's file system
    others: int  # bytes of files in the cache that are not this model's (counted against the budget)


def disk_problems(cache_dir: Path, repo: str, need: int, have: int, budget: int | None, disk: CacheDisk) -> list[str]:
    """Why ``need`` bytes of ``repo``'s files, ``have`` of them already in the cache, do not fit: over the budget
    (FARLABS_MAX_DISK_SPACE, None = no limit) together with the cache's other files, or over the free space less a
    reserve. [] when they fit. One line per problem, naming the setting to change."""
    problems = []
    if budget is not None and disk.others + need > budget:
        held = f" and the cache already holds {format_size(disk.others)} of other files in {cache_dir}" \
            if disk.others else ""
        problems.append(f"FARLABS_MAX_DISK_SPACE={format_size(budget)} is too small for {repo}: its files need "
                        f"{format_size(need)}{held}; expected at least {format_size(disk.others + need)} "
                        "(or 0 for no limit)")
    remaining = need - have
    if remaining > 0 and remaining + FREE_SPACE_RESERVE > disk.free:
        problems.append(f"FARLABS_CACHE_DIR={str(cache_dir)!r} has {format_size(disk.free)} free: expected "
                        f"{format_size(remaining + FREE_SPACE_RESERVE)} for {repo} (free space, or point "
                        "FARLABS_CACHE_DIR at a larger disk)")
    return problems


def read_cache_disk(cache_dir: Path, repo_dir: Path, budget: int | None) -> CacheDisk:
    """The free space under ``cache_dir`` (which need not exist yet) and, when a budget is set, the bytes of the
    cache's files outside ``repo_dir``. Looks only, creates nothing."""
    others = tree_bytes(cache_dir, exclude=repo_dir) if budget is not None else 0
    return CacheDisk(free=shutil.disk_usage(existing_parent(cache_dir)).free, others=others)


def tree_bytes(root: Path, exclude: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == exclude:
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != exclude]
        for name in filenames:
            path = Path(dirpath, name)
            try:
                if not path.is_symlink():
                    total += path.stat().st_size
            except OSError:
                pass
    return total


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_size(size: int) -> str:
    """Decimal units, as disks and the hub count: 3.2 MB, 13.5 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
