"""Progress of a conversion: per-layer bars on a terminal, silence otherwise."""

import sys
import time
from dataclasses import dataclass
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, key: str, phase: str, total: int) -> None: ...

    def advance(self, key: str, amount: int) -> None: ...

    def finish(self, key: str, note: str = "") -> None: ...

    def message(self, text: str) -> None: ...


class NoProgress:
    def start(self, key: str, phase: str, total: int) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str, note: str = "") -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass
class _Bar:
    phase: str
    total: int
    done: int = 0
    note: str = ""
    finished: bool = False


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}GB"


class TerminalProgress:
    """Redraws one line per layer in place (ANSI cursor moves), at most 10 times a second."""

    WIDTH = 24

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.bars: dict[str, _Bar] = {}
        self.drawn = 0
        self.last = 0.0

    def start(self, key: str, phase: str, total: int) -> None:
        self.bars[key] = _Bar(phase, total)
        self._draw(force=True)

    def advance(self, key: str, amount: int) -> None:
        bar = self.bars.get(key)
        if bar:
            bar.done += amount
            self._draw()

    def finish(self, key: str, note: str = "") -> None:
        bar = self.bars.get(key)
        if bar:
            bar.finished, bar.note = True, note
            bar.done = max(bar.done, bar.total)
            self._draw(force=True)

    def message(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream)
        self._draw(force=True)

    def _line(self, key: str, bar: _Bar) -> str:
        if bar.finished:
            return f"{key:<20} {bar.phase:<10} done {bar.note}"
        share = bar.done / bar.total if bar.total else 0.0
        filled = int(share * self.WIDTH)
        gauge = "#" * filled + "." * (self.WIDTH - filled)
        return f"{key:<20} {bar.phase:<10} [{gauge}] {_size(bar.done)}/{_size(bar.total)}"

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        self._clear()
        lines = [self._line(k, b) for k, b in self.bars.items()]
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self.drawn = len(lines)
