"""One-line causes for failed downloads: the innermost error's own words, without a library's boilerplate."""

from __future__ import annotations

__all__ = ["cause_of"]


def cause_of(error: BaseException) -> str:
    """What went wrong, as a short clause for inside a sentence: `Connection refused`, `timed out`, ….

    Follows the chain of exceptions to the one that started it (a refused connection, not the hub client's
    "An error happened while trying to locate the files…"), takes its first line, and drops a final period
    so the caller's sentence does not end in two.
    """
    innermost = error
    seen = {id(error)}
    while (earlier := innermost.__cause__ or innermost.__context__) is not None and id(earlier) not in seen:
        seen.add(id(earlier))
        innermost = earlier
    text = innermost.strerror if isinstance(innermost, OSError) and innermost.strerror else str(innermost)
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()).rstrip(".") if lines else type(innermost).__name__
