"""A shaped network path to a registry on this machine: a rate limit and a one-way delay.

This kernel has no netem (and no modules to load), so the delay is a userspace
forwarder. The topology, all of it in namespaces this module creates:

    root namespace          namespace lpperf-fwd                 namespace lpperf-reg
    lpp-h 10.203.77.1/30 -- lpp-fa  [forwarder: holds every  -- lpp-fb ... lpp-r 10.203.77.2/30
    (tbf: client -> reg)            frame DELAY ms, both ways]           (tbf: reg -> client)

`lpp-h`/`lpp-fa` and `lpp-fb`/`lpp-r` are veth pairs. The forwarder bridges `lpp-fa`
and `lpp-fb` at layer 2 with AF_PACKET sockets (PACKET_VNET_HDR, so 64 KiB GSO frames
pass whole with their checksum-offload state, and PACKET_IGNORE_OUTGOING, so it never
reads back what it sent). Every frame waits DELAY ms in a queue before it is sent on:
TCP between the root namespace and the registry sees the real round-trip time (slow
start, window growth, idle restarts), not a proxy's. tbf limits each direction at the
sender's veth (the bottleneck comes first, then the propagation delay).

Addresses: a /30 of 10/8 that no route of this machine covers; traffic goes only
between the root namespace and the registry's namespace. `ShapedPath.close` ends the
forwarder by its PID and deletes both namespaces (which deletes the veths with them).

Run as `python -m perf.netem forward IF_A IF_B DELAY_MS` inside the forwarding
namespace (ShapedPath does that).
"""

import collections
import ipaddress
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NS_FORWARD = "lpperf-fwd"
NS_REGISTRY = "lpperf-reg"
HOST_IF, FWD_A, FWD_B, REG_IF = "lpp-h", "lpp-fa", "lpp-fb", "lpp-r"
SUBNET_CANDIDATES = ("10.203.77.0/30", "10.203.78.0/30", "10.231.5.0/30", "10.117.9.0/30")
REPO_ROOT = Path(__file__).resolve().parent.parent

# linux/if_packet.h, linux/if_ether.h
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
VNET_HDR_LEN = 10
FRAME_MAX = 256 << 10


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def free_subnet() -> ipaddress.IPv4Network:
    """The first candidate /30 that no address or route of the root namespace overlaps."""
    used = []
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("default", "broadcast", "local", "unreachable"):
            word = line.split()[1] if word != "default" else ""
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for text in SUBNET_CANDIDATES:
        net = ipaddress.ip_network(text)
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("every candidate /30 overlaps a route of this machine")


# -- the forwarder ------------------------------------------------------------------------


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 20)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def forward(if_a: str, if_b: str, delay_s: float) -> None:
    """Bridge two interfaces, holding every frame `delay_s` seconds; runs until SIGTERM."""
    socks = {if_a: _packet_socket(if_a), if_b: _packet_socket(if_b)}
    other = {if_a: socks[if_b], if_b: socks[if_a]}
    queues: dict[str, collections.deque[tuple[float, bytes]]] = {
        if_a: collections.deque(), if_b: collections.deque()}
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    selector = selectors.DefaultSelector()
    for name, sock in socks.items():
        selector.register(sock, selectors.EVENT_READ, name)
    print("forwarding", flush=True)
    while not stop:
        now = time.monotonic()
        # Send what is due; a full send buffer leaves the frame at the head of its queue.
        for name, queue in queues.items():
            out = other[name]
            while queue and queue[0][0] <= now:
                try:
                    out.send(queue[0][1])
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. a frame the other side cannot take: drop it
                    print(f"dropped a {len(queue[0][1])}-byte frame: {exc}", file=sys.stderr)
                queue.popleft()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 0.5
        for key, _ in selector.select(timeout):
            sock, name = key.fileobj, key.data
            release = time.monotonic() + delay_s
            for _ in range(256):
                try:
                    frame = sock.recv(FRAME_MAX)  # type: ignore[union-attr]
                except BlockingIOError:
                    break
                if len(frame) > VNET_HDR_LEN:
                    queues[name].append((release, frame))


# -- the path ---------------------------------------------------------------------------


@dataclass
class ShapedPath:
    rate: str  # tc rate, e.g. "100mbit"
    delay_ms: float  # one way
    workdir: Path
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)
    forwarder: subprocess.Popen | None = None
    shaped: bool = False

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def registry_address(self) -> str:
        return str(self.subnet.network_address + 2)

    def open(self) -> "ShapedPath":
        """Namespaces, veths, addresses and the forwarder; no rate limit yet (see shape)."""
        for ns in (NS_FORWARD, NS_REGISTRY):
            if ns in sh("ip", "netns", "list").stdout.split():
                raise RuntimeError(f"network namespace {ns} exists: another run, or a "
                                   f"leftover (`ip netns del {ns}` if no run is going on)")
        sh("ip", "netns", "add", NS_FORWARD)
        try:
            sh("ip", "netns", "add", NS_REGISTRY)
            sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", FWD_A,
               "netns", NS_FORWARD)
            in_ns(NS_FORWARD, "ip", "link", "add", FWD_B, "type", "veth", "peer", "name",
                  REG_IF, "netns", NS_REGISTRY)
            prefix = self.subnet.prefixlen
            sh("sysctl", "-qw", f"net.ipv6.conf.{HOST_IF}.disable_ipv6=1")
            sh("ip", "addr", "add", f"{self.host_address}/{prefix}", "dev", HOST_IF)
            sh("ip", "link", "set", HOST_IF, "up")
            for ns in (NS_FORWARD, NS_REGISTRY):
                in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
                in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
                in_ns(ns, "ip", "link", "set", "lo", "up")
            for name in (FWD_A, FWD_B):
                in_ns(NS_FORWARD, "ip", "link", "set", name, "up")
            in_ns(NS_REGISTRY, "ip", "addr", "add", f"{self.registry_address}/{prefix}",
                  "dev", REG_IF)
            in_ns(NS_REGISTRY, "ip", "link", "set", REG_IF, "up")
            self.start_forwarder(0.0)
        except BaseException:
            self.close()
            raise
        return self

    def start_forwarder(self, delay_ms: float) -> None:
        self.stop_forwarder()
        log = open(self.workdir / "forwarder.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.forwarder = subprocess.Popen(
            ["ip", "netns", "exec", NS_FORWARD, sys.executable, "-m", "perf.netem", "forward",
             FWD_A, FWD_B, str(delay_ms)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert self.forwarder.stdout is not None
        if self.forwarder.stdout.readline().strip() != b"forwarding":
            raise RuntimeError(f"the forwarder did not start: {self.workdir / 'forwarder.log'}")

    def stop_forwarder(self) -> None:
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.send_signal(signal.SIGTERM)  # by PID
            try:
                self.forwarder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                self.forwarder.wait()
        self.forwarder = None

    def shape(self) -> None:
        """The measured setting: tbf at `rate` both ways, the forwarder at `delay_ms`.

        tbf needs a burst of at least one 64 KiB GSO frame; its queue holds about the
        path's bandwidth-delay product (latency 2 x one-way delay, at least 20 ms).
        """
        latency = f"{max(20.0, 2 * self.delay_ms):g}ms"
        tbf = ["tbf", "rate", self.rate, "burst", "128kb", "latency", latency]
        sh("tc", "qdisc", "replace", "dev", HOST_IF, "root", *tbf)
        in_ns(NS_REGISTRY, "tc", "qdisc", "replace", "dev", REG_IF, "root", *tbf)
        self.start_forwarder(self.delay_ms)
        self.shaped = True

    def unshape(self) -> None:
        sh("tc", "qdisc", "del", "dev", HOST_IF, "root", check=False)
        in_ns(NS_REGISTRY, "tc", "qdisc", "del", "dev", REG_IF, "root", check=False)
        self.start_forwarder(0.0)
        self.shaped = False

    def bytes_to_host(self) -> int:
        """Bytes the registry's side has sent towards the host (tbf's counter, frames
        with their headers): what a sample downloaded, as a difference."""
        out = in_ns(NS_REGISTRY, "tc", "-s", "qdisc", "show", "dev", REG_IF).stdout
        words = out.split()
        if "Sent" in words:
            return int(words[words.index("Sent") + 1])
        return int(in_ns(NS_REGISTRY, "cat", f"/sys/class/net/{REG_IF}/statistics/tx_bytes")
                   .stdout.strip())

    def close(self) -> None:
        self.stop_forwarder()
        sh("ip", "link", "del", HOST_IF, check=False)
        for ns in (NS_REGISTRY, NS_FORWARD):
            sh("ip", "netns", "del", ns, check=False)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "forward":
        forward(argv[1], argv[2], float(argv[3]) / 1000)
        return 0
    print("usage: python -m perf.netem forward IF_A IF_B DELAY_MS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
