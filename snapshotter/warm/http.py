"""The warm set's routes on the service's HTTP endpoint:

GET /warm                               status of every entry (JSON)
POST /warm/refresh[?ref=REF][&wait=0]   refresh REF (all if absent) now; by default the
                                        answer comes when that attempt has ended
"""

import json
from urllib.parse import parse_qs

from ..http_endpoint import Route
from .manager import WarmSet

JSON = "application/json"
REFRESH_TIMEOUT_SECONDS = 900.0


def _json(status: int, doc: object) -> tuple[int, str, bytes]:
    return status, JSON, (json.dumps(doc, indent=2) + "\n").encode()


def warm_routes(warm: WarmSet) -> Route:
    async def route(method: str, path: str, query: str) -> tuple[int, str, bytes] | None:
        if path == "/warm":
            if method not in ("GET", "HEAD"):
                return _json(405, {"error": "use GET"})
            return _json(200, await warm.status())
        if path == "/warm/refresh":
            if method != "POST":
                return _json(405, {"error": "use POST"})
            params = parse_qs(query)
            ref = params.get("ref", [None])[0] or None
            wait = params.get("wait", ["1"])[0].lower() not in ("0", "false", "no")
            try:
                timeout = float(params.get("timeout", [REFRESH_TIMEOUT_SECONDS])[0])
            except ValueError:
                return _json(400, {"error": "timeout must be a number of seconds"})
            try:
                entries = await warm.refresh(ref, timeout if wait else 0)
            except KeyError:
                return _json(404, {"error": f"{ref} is not in the warm set"})
            await warm.status()  # counts bytes
            return _json(200 if wait else 202, {"images": [e.to_json() for e in entries]})
        return None

    return route
