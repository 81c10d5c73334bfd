"""A shaped network path to a registry on this machine: a rate limit and a one-way delay.

This kernel has no netem (and no modules to load), so the delay is a userspace
forwarder. The topology, all of it in namespaces this module creates:

    root namespace          namespace lpperf0-fwd                namespace lpperf0-reg
    lpp0-h 10.203.77.1/30 - lpp0-fa [forwarder: holds every  -- lpp0-fb .. lpp0-r 10.203.77.2/30
    (tbf: client -> reg)            frame DELAY ms, both ways]           (tbf: reg -> client)

`lpp0-h`/`lpp0-fa` and `lpp0-fb`/`lpp0-r` are veth pairs (slot 0; a second run
beside it takes slot 1, and so on). The forwarder bridges `lpp-fa`
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
from dataclasses import dataclass
from pathlib import Path

from perf.processes import stop_process

# Each path takes a free slot, so runs side by side (a benchmark beside the tests) do not
# meet: slot N names its namespaces lpperfN-fwd / lpperfN-reg and its veths lppN-*.
SLOTS = 4
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


def free_subnet(first: int = 0) -> ipaddress.IPv4Network:
    """The first candidate /30, from candidate `first` on (a slot's own, so runs that
    start together pick different ones), that no address or route of the root
    namespace overlaps."""
    used = []
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("default", "broadcast", "local", "unreachable"):
            word = line.split()[1] if word != "default" else ""
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for text in SUBNET_CANDIDATES[first:] + SUBNET_CANDIDATES[:first]:
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
    subnet: ipaddress.IPv4Network | None = None  # chosen at open
    forwarder: subprocess.Popen | None = None
    shaped: bool = False
    slot: int | None = None  # taken at open

    @property
    def ns_forward(self) -> str:
        return f"lpperf{self.slot}-fwd"

    @property
    def ns_registry(self) -> str:
        return f"lpperf{self.slot}-reg"

    def _if(self, role: str) -> str:
        return f"lpp{self.slot}-{role}"

    @property
    def host_address(self) -> str:
        assert self.subnet is not None, "open() first"
        return str(self.subnet.network_address + 1)

    @property
    def registry_address(self) -> str:
        assert self.subnet is not None, "open() first"
        return str(self.subnet.network_address + 2)

    def _take_slot(self) -> None:
        """The first slot whose forwarding namespace this call creates: `ip netns add`
        fails when the name exists, so two runs starting together never share one."""
        for slot in range(SLOTS):
            if sh("ip", "netns", "add", f"lpperf{slot}-fwd", check=False).returncode == 0:
                self.slot = slot
                return
        raise RuntimeError(f"all {SLOTS} shaped-path slots are taken (namespaces lpperfN-fwd): "
                           "other runs, or leftovers (`ip netns del` them if none is going on)")

    def open(self) -> "ShapedPath":
        """Namespaces, veths, addresses and the forwarder; no rate limit yet (see shape)."""
        self._take_slot()
        host_if, fwd_a, fwd_b, reg_if = (self._if(r) for r in ("h", "fa", "fb", "r"))
        try:
            if self.subnet is None:
                self.subnet = free_subnet(self.slot or 0)
            sh("ip", "netns", "add", self.ns_registry)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", fwd_a,
               "netns", self.ns_forward)
            in_ns(self.ns_forward, "ip", "link", "add", fwd_b, "type", "veth", "peer", "name",
                  reg_if, "netns", self.ns_registry)
            prefix = self.subnet.prefixlen
            sh("sysctl", "-qw", f"net.ipv6.conf.{host_if}.disable_ipv6=1")
            sh("ip", "addr", "add", f"{self.host_address}/{prefix}", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            for ns in (self.ns_forward, self.ns_registry):
                in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
                in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
                in_ns(ns, "ip", "link", "set", "lo", "up")
            for name in (fwd_a, fwd_b):
                in_ns(self.ns_forward, "ip", "link", "set", name, "up")
            in_ns(self.ns_registry, "ip", "addr", "add", f"{self.registry_address}/{prefix}",
                  "dev", reg_if)
            in_ns(self.ns_registry, "ip", "link", "set", reg_if, "up")
            self.start_forwarder(0.0)
        except BaseException:
            self.close()
            raise
        return self

    def start_forwarder(self, delay_ms: float) -> None:
        self.stop_forwarder()
        log = open(self.workdir / "forwarder.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.forwarder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_forward, sys.executable, "-m", "perf.netem",
             "forward", self._if("fa"), self._if("fb"), str(delay_ms)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert self.forwarder.stdout is not None
        if self.forwarder.stdout.readline().strip() != b"forwarding":
            raise RuntimeError(f"the forwarder did not start: {self.workdir / 'forwarder.log'}")

    def stop_forwarder(self) -> None:
        stop_process(self.forwarder)
        self.forwarder = None

    def shape(self) -> None:
        """The measured setting: tbf at `rate` both ways, the forwarder at `delay_ms`.

        tbf needs a burst of at least one 64 KiB GSO frame; its queue holds about the
        path's bandwidth-delay product (latency 2 x one-way delay, at least 20 ms).
        """
        latency = f"{max(20.0, 2 * self.delay_ms):g}ms"
        tbf = ["tbf", "rate", self.rate, "burst", "128kb", "latency", latency]
        sh("tc", "qdisc", "replace", "dev", self._if("h"), "root", *tbf)
        in_ns(self.ns_registry, "tc", "qdisc", "replace", "dev", self._if("r"), "root", *tbf)
        self.start_forwarder(self.delay_ms)
        self.shaped = True

    def unshape(self) -> None:
        sh("tc", "qdisc", "del", "dev", self._if("h"), "root", check=False)
        in_ns(self.ns_registry, "tc", "qdisc", "del", "dev", self._if("r"), "root", check=False)
        self.start_forwarder(0.0)
        self.shaped = False

    def bytes_to_host(self) -> int:
        """Bytes the registry's side has sent towards the host (tbf's counter, frames
        with their headers): what a sample downloaded, as a difference."""
        out = in_ns(self.ns_registry, "tc", "-s", "qdisc", "show", "dev", self._if("r")).stdout
        words = out.split()
        if "Sent" in words:
            return int(words[words.index("Sent") + 1])
        stats = f"/sys/class/net/{self._if('r')}/statistics/tx_bytes"
        return int(in_ns(self.ns_registry, "cat", stats)
                   .stdout.strip())

    def close(self) -> None:
        self.stop_forwarder()
        if self.slot is None:
            return
        sh("ip", "link", "del", self._if("h"), check=False)
        for ns in (self.ns_registry, self.ns_forward):
            sh("ip", "netns", "del", ns, check=False)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "forward":
        forward(argv[1], argv[2], float(argv[3]) / 1000)
        return 0
    print("usage: python -m perf.netem forward IF_A IF_B DELAY_MS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
