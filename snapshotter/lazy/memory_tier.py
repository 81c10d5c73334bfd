"""The chunk cache's memory tier: recently used chunks' bytes, within a byte budget.

Two LRU segments share the budget. Chunks that were only stored (`admit_stored`: a
fetch, often a background one) wait in a probation segment of at most
`probation_share` of the budget; a chunk read from the cache (`admit_read`, or a hit
on a probationary chunk, as when a read follows the fetch it caused) moves to the
main segment. When the tier is full, probation gives way first. So a background
fetch storing a million chunks costs at most the probation share of memory, and the
chunks that readers use stay in place.

Each entry is charged ENTRY_OVERHEAD bytes beside its data (the key, the bytes
object's header, the links of the LRU), so the budget bounds the real memory even
when chunks are a few bytes each.

A read from disk happens outside the cache's locks, so the chunk it read may be
evicted meanwhile; `mark()` before the read and `admit_read(..., since=mark)` after it
keep such a chunk out (the tier holds only chunks the cache still stores).

Not thread-safe: the cache calls it under its lock.
"""

import itertools
from collections import OrderedDict, deque

# Bytes of Python objects per entry besides the chunk's: the key, the bytes object's
# header, the LRU's links and the dict slack that churn leaves (measured 275 to 300).
ENTRY_OVERHEAD = 320
FORGET_LOG = 4096  # forgotten chunks remembered for reads that were under way


class MemoryTier:
    def __init__(self, max_bytes: int, item_limit: int, probation_share: float = 0.25):
        self.max_bytes = max_bytes
        self.item_limit = item_limit
        self.probation_max = int(max_bytes * probation_share)
        self._main: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._probation: OrderedDict[str, bytes] = OrderedDict()
        self._main_bytes = 0
        self._probation_bytes = 0
        self._forgotten: deque[str] = deque(maxlen=FORGET_LOG)
        self._forget_count = 0

    @property
    def used_bytes(self) -> int:
        """Bytes charged: the chunks and ENTRY_OVERHEAD for each."""
        return self._main_bytes + self._probation_bytes

    def __contains__(self, digest: str) -> bool:
        return digest in self._main or digest in self._probation

    def get(self, digest: str) -> bytes | None:
        data = self._main.get(digest)
        if data is not None:
            self._main.move_to_end(digest)
            return data
        data = self._probation.pop(digest, None)
        if data is None:
            return None
        cost = _cost(data)
        self._probation_bytes -= cost
        self._main[digest] = data  # read again after it was stored: no longer on probation
        self._main_bytes += cost
        return data

    def admit_stored(self, digest: str, data: bytes) -> None:
        """A chunk just stored (or stored again): on probation unless already held."""
        if digest in self or not self._fits(data):
            return
        self._probation[digest] = data
        self._probation_bytes += _cost(data)
        while self._probation_bytes > self.probation_max:
            self._pop(main=False)
        self._shrink()

    def mark(self) -> int:
        """A position in the log of forgotten chunks, taken before a read from disk."""
        return self._forget_count

    def admit_read(self, digest: str, data: bytes, since: int) -> None:
        """A chunk read from disk, unless it was forgotten after `since` (or too many
        chunks were forgotten since then to tell)."""
        forgotten_since = self._forget_count - since
        if forgotten_since > len(self._forgotten):
            return
        if digest in itertools.islice(reversed(self._forgotten), forgotten_since):
            return
        if digest in self._main:
            self._main.move_to_end(digest)
            return
        if digest in self._probation:
            self.get(digest)
            return
        if not self._fits(data):
            return
        self._main[digest] = data
        self._main_bytes += _cost(data)
        self._shrink()

    def forget(self, digest: str) -> None:
        """The cache no longer stores the chunk."""
        self._forgotten.append(digest)
        self._forget_count += 1
        for segment, is_main in ((self._main, True), (self._probation, False)):
            data = segment.pop(digest, None)
            if data is not None:
                self._charge(is_main, -_cost(data))

    def _fits(self, data: bytes) -> bool:
        return len(data) <= self.item_limit and _cost(data) <= self.max_bytes

    def _shrink(self) -> None:
        while self.used_bytes > self.max_bytes:
            self._pop(main=not self._probation)

    def _pop(self, main: bool) -> None:
        """Drop the least recently used chunk of a segment."""
        _, data = (self._main if main else self._probation).popitem(last=False)
        self._charge(main, -_cost(data))

    def _charge(self, main: bool, amount: int) -> None:
        if main:
            self._main_bytes += amount
        else:
            self._probation_bytes += amount


def _cost(data: bytes) -> int:
    return len(data) + ENTRY_OVERHEAD
