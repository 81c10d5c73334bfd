"""Path patterns of prefetch lists: plain paths and globs.

`*`, `?` and `[...]` match within one path component; `**` matches any number of
components. Paths are compared without a leading `/` or `./`.
"""

import re
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


def expand(patterns: list[str], paths: list[str]) -> tuple[list[str], list[str]]:
    """Paths matched by `patterns`, in pattern order (then path order within a glob),
    each once; and the patterns that matched nothing."""
    available = set(paths)
    ordered: dict[str, None] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        if not is_glob(pattern):
            path = normalize_path(pattern)
            if path in available:
                ordered.setdefault(path, None)
            else:
                unmatched.append(pattern)
            continue
        regex = compile_glob(pattern)
        hits = [p for p in paths if regex.fullmatch(p)]
        if not hits:
            unmatched.append(pattern)
        for path in hits:
            ordered.setdefault(path, None)
    return list(ordered), unmatched
