"""What a benchmark ran on, recorded beside its figures: the machine, the tools'
versions and the commit."""

import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def first_line(command: list[str]) -> str | None:
    """The first line a command prints, or None if it cannot run or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.splitlines()[0] if done.stdout else None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe(*tools: str, **commands: list[str]) -> dict[str, object]:
    """Python, the platform, the CPU, the commit, and the first line of `TOOL --version`
    for each tool named (its key with `-` as `_`) or of each command given by key."""
    found: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    for tool in tools:
        found[tool.replace("-", "_")] = first_line([tool, "--version"])
    for key, command in commands.items():
        found[key] = first_line(command)
    found["git_commit"] = first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    return found


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned text, the first one a header underlined with dashes: names
    left-aligned, numbers right-aligned so their digits line up."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:],
                                                                   strict=True)])

    lines = [line(r) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
