"""`lazypull warm status|refresh`: the warm set of a running service, over its HTTP
endpoint (GET /warm, POST /warm/refresh)."""

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 6

DESCRIPTION = """\
Show or refresh the warm set of the running snapshotter service: the images it
pulls into containerd at start and keeps fresh (config: warm_set, warm_set_dir).
The service is reached at its metrics address (--address, or the config's
metrics_address).

exit codes:
  0 ok   1 not every image is warm (status) / the refresh left one failed
  2 usage error   6 the service cannot be reached
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("warm", help="show or refresh the service's warm set",
                            description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="warm_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="per image: digest, state, bytes, refresh times")
    refresh = actions.add_parser("refresh", help="refresh one image (or all) now")
    refresh.add_argument("reference", metavar="REF", nargs="?",
                         help="the warm-set reference (default: every image)")
    refresh.add_argument("--no-wait", action="store_true",
                         help="return at once instead of when the refresh has ended")
    refresh.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                         help="longest wait for the refresh (default: %(default)s)")
    for sub in (status, refresh):
        sub.add_argument("--address", metavar="URL",
                         help="the service's HTTP endpoint, http://HOST:PORT (default: from "
                              "the config's metrics_address)")
        sub.add_argument("--config", metavar="FILE",
                         help="service config to read metrics_address from "
                              "(default /etc/lazypull/config.toml if present)")
        sub.add_argument("--json", action="store_true", help="print JSON on stdout")
    status.set_defaults(run=run_status)
    refresh.set_defaults(run=run_refresh)


class _Failure(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _base_url(args: argparse.Namespace) -> str:
    if args.address:
        url = args.address if "://" in args.address else f"http://{args.address}"
        return url.rstrip("/")
    from snapshotter.config import ConfigError, load_config, metrics_host_port
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise _Failure(EXIT_USAGE, str(exc)) from None
    if not config.metrics_address:
        raise _Failure(EXIT_USAGE, "no --address, and the config sets no metrics_address")
    host, port = metrics_host_port(config.metrics_address)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _request(url: str, method: str = "GET", timeout: float = 30.0) -> dict[str, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            try:
                message = json.load(exc).get("error", "")
            except ValueError:
                message = ""
            raise _Failure(EXIT_FAILURE, message or "the service has no warm set "
                                                    "configured") from None
        raise _Failure(EXIT_FAILURE, f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Failure(EXIT_UNREACHABLE, f"cannot reach the service at {url}: {reason}") \
            from None
    except ValueError:
        raise _Failure(EXIT_FAILURE, f"{url}: the answer is not JSON") from None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def _state(image: dict[str, Any]) -> str:
    state = image["state"]
    detail = image.get("progress") if state == "warming" else image.get("reason")
    return f"{state} ({detail})" if detail else state


def _table(images: list[dict[str, Any]]) -> str:
    header = ("REF", "NAMESPACE", "POLICY", "DIGEST", "STATE", "CACHED/TOTAL", "LAST REFRESH",
              "NEXT REFRESH")
    rows = [header]
    for image in images:
        digest = image.get("digest") or "-"
        rows.append((image["ref"], image["namespace"], image["policy"],
                     digest[:19] if digest != "-" else digest, _state(image),
                     f"{_size(image['bytes_cached'])}/{_size(image['bytes_total'])}",
                     image.get("last_refresh") or "-", image.get("next_refresh") or "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths,
                                                                      strict=True)).rstrip()
                     for row in rows)


def _fail(args: argparse.Namespace, failure: _Failure) -> int:
    print(f"lazypull warm {args.warm_command}: {failure}", file=sys.stderr)
    return failure.code


def run_status(args: argparse.Namespace) -> int:
    try:
        doc = _request(_base_url(args) + "/warm")
    except _Failure as failure:
        return _fail(args, failure)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(_table(doc.get("images", [])))
        for error in doc.get("errors", []):
            print(f"warning: {error}", file=sys.stderr)
        if not doc.get("ready"):
            print(doc.get("reason", "not ready"), file=sys.stderr)
    return EXIT_OK if doc.get("ready") else EXIT_FAILURE


def run_refresh(args: argparse.Namespace) -> int:
    query = {}
    if args.reference:
        query["ref"] = args.reference
    if args.no_wait:
        query["wait"] = "0"
    else:
        query["timeout"] = str(args.timeout)
    try:
        doc = _request(f"{_base_url(args)}/warm/refresh?{urllib.parse.urlencode(query)}", "POST",
                       timeout=args.timeout + 30)
    except _Failure as failure:
        return _fail(args, failure)
    images = doc.get("images", [])
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(_table(images))
    if args.no_wait:
        return EXIT_OK
    return EXIT_FAILURE if any(i["state"] == "failed" for i in images) else EXIT_OK

