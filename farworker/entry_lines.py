"""The line format of the operator's key and allowlist files (--api-keys, --client-keys, --registration-allowlist):
one entry per line, its fields split on whitespace; blank lines and # comments are skipped."""

from __future__ import annotations

from collections.abc import Iterator


def entries(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each line holding an entry: the numbers an error message names."""
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            yield number, fields
