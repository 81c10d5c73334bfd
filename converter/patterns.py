"""Path patterns of prefetch lists: plain paths and globs.

`*`, `?` and `[...]` match within one path component; `**` matches any number of
components. Paths are compared without a leading `/` or `./`.
"""

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache


def normalize_path(path: str) -> str:
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    return "/".join(parts)


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


@lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> re.Pattern[str]:
    pattern = normalize_path(pattern)
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(ch))
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"(?!/)[{body}]")
                i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out))


def expand(patterns: Sequence[str], paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Paths matched by `patterns`, in pattern order (then path order within a glob),
    each once; and the patterns that matched nothing.

    `paths` is read once, as a stream, and may name a path again (the layers of an
    image one after another): a path's place is where it first appears. Memory holds
    the matches, never the paths."""
    plain = {normalize_path(p) for p in patterns if not is_glob(p)}
    globs = [(p, compile_glob(p)) for p in dict.fromkeys(p for p in patterns if is_glob(p))]
    present: set[str] = set()
    hits: dict[str, dict[str, None]] = {pattern: {} for pattern, _ in globs}
    for path in paths:
        if path in plain:
            present.add(path)
        for pattern, regex in globs:
            if regex.fullmatch(path):
                hits[pattern].setdefault(path, None)
    ordered: dict[str, None] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        if is_glob(pattern):
            found = list(hits[pattern])
        else:
            path = normalize_path(pattern)
            found = [path] if path in present else []
        if not found:
            unmatched.append(pattern)
        for path in found:
            ordered.setdefault(path, None)
    return list(ordered), unmatched
