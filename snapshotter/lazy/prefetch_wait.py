"""What a container's Prepare waits for of its lazy layers' prefetch.

WHOLE: every prefetched chunk verified and cached. FIRST_BYTES: the first of the
prefetch's requests verified and cached (or its end), which proves the registry serves
the blob, so a registry that is down still refuses the container with UNAVAILABLE;
the container's reads of chunks still on their way wait for their request (lazy.fetcher
hands every planned chunk a future), so it is created while the prefetch's tail arrives.
"""

import asyncio

FIRST_BYTES, WHOLE = "first-bytes", "whole"
UNTIL = (FIRST_BYTES, WHOLE)


async def first_bytes(prefetch: "asyncio.Future[int]", answered: asyncio.Event) -> None:
    """Return once `answered` is set or `prefetch` has ended; raise the prefetch's
    failure if it ended first."""
    waiter = asyncio.create_task(answered.wait())
    try:
        await asyncio.wait((prefetch, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not answered.is_set():
        prefetch.result()  # it ended first: its failure is the wait's
