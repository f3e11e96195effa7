"""Test hosts in Linux network namespaces, for tests that cross a real network.

A :class:`Lab` makes one namespace per host, each with an ``eth0`` on
10.77.0.0/24 and its own loopback, plus a "switch" namespace holding the
bridge that joins them (veth pairs: ``eth0`` in the host, ``v-NAME`` on the
bridge). Nothing is added to the machine's own network namespace, so labs
of concurrent test runs (each named after its pid) cannot clash, even on
the same subnet.

* :meth:`Lab.python` runs a Python script inside a host (``ip netns exec``)
  as a :class:`Peer` whose stdout is read line by line as JSON events, every
  wait bounded (:meth:`Peer.expect`);
* :meth:`Lab.link_down` cuts a host's cable (its bridge port goes down: the
  host keeps its address and sees no error, its packets just vanish), and
  :meth:`Lab.link_up` plugs it back;
* :meth:`Lab.close` (also the context manager's exit) kills every process
  it started and deletes every namespace, whatever happened in the test;
  a new lab also deletes namespaces left by dead test processes.

:func:`unavailable_reason` says why namespaces cannot be made here (not
root, no ``ip``, no permission); tests skip with that reason, except when
``ZMQ_CLUSTER_REQUIRE_NETNS=1`` (CI, which runs as root) makes it a failure.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

SUBNET = "10.77.0"
REQUIRE_ENV = "ZMQ_CLUSTER_REQUIRE_NETNS"
_PREFIX_RE = re.compile(r"^zc(\d+)n\d+-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when this process can make network namespaces, else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are a Linux feature"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = "zc%dn0-probe" % os.getpid()
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return "`ip netns add` failed: %s" % made.stderr.strip()
    _ip("netns", "del", probe, check=False)
    return None


def namespaces_required() -> bool:
    """True when a missing namespace facility must fail the tests (CI)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require_namespaces() -> None:
    """In a test: skip it (with the reason) where namespaces cannot be
    made; fail it instead where they are required (CI)."""
    import pytest  # only the tests call this; the lab itself runs without pytest

    reason = unavailable_reason()
    if reason is not None:
        if namespaces_required():
            pytest.fail("network namespaces are required here but: %s" % reason)
        pytest.skip(reason)


def _remove_stale_namespaces() -> None:
    """Delete the namespaces of labs whose test process has died."""
    listed = _ip("netns", "list", check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _PREFIX_RE.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _ip("netns", "del", name, check=False)


@dataclass(frozen=True)
class Host:
    """A test host: its namespace, address and bridge port."""

    name: str
    namespace: str
    address: str
    port: str  # its veth end on the bridge, in the switch namespace


class Peer:
    """A process in a host, speaking JSON lines on stdout.

    Each line the process prints is parsed (non-JSON lines are kept as
    ``{"event": "text", "text": ...}``) and queued with its arrival time;
    :meth:`expect` waits a bounded time for a matching one. stderr goes to a
    file shown when an expectation fails.
    """

    def __init__(self, host: Host, args: list[str], env: Optional[dict[str, str]] = None):
        self.host = host
        self.args = args
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1,
            start_new_session=True, env=env)
        self.events: list[dict[str, Any]] = []   # every event read so far
        self._queue: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "text": line}
            if not isinstance(event, dict):
                event = {"event": "text", "text": line}
            event["_time"] = time.monotonic()
            self._queue.put(event)
        self._queue.put(None)  # end of output

    def expect(self, match: Callable[[dict[str, Any]], bool] | str, timeout: float = 10.0,
               ) -> dict[str, Any]:
        """The next event that ``match`` accepts (a predicate, or an event
        name), waiting at most ``timeout`` seconds; events passed over are
        kept in :attr:`events`. Fails the test on timeout or exit."""
        if isinstance(match, str):
            name = match
            match = lambda e: e.get("event") == name  # noqa: E731
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = self._queue.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError("%s: no matching event within %gs\n%s"
                                     % (self, timeout, self.transcript())) from None
            if event is None:
                self._queue.put(None)
                raise AssertionError("%s exited (status %s) before a matching event\n%s"
                                     % (self, self.process.wait(5), self.transcript()))
            self.events.append(event)
            if match(event):
                return event

    def drain(self) -> list[dict[str, Any]]:
        """Read what has been printed so far (no waiting) into :attr:`events`."""
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return self.events
            if event is None:
                self._queue.put(None)
                return self.events
            self.events.append(event)

    def send(self, line: str) -> None:
        """Write a line to the process's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Close stdin (the peers' signal to stop), wait for the exit and
        return every event; fails the test if it does not exit in time or
        exits non-zero."""
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("%s did not exit within %gs\n%s"
                                 % (self, timeout, self.transcript())) from None
        self._reader.join(timeout)
        self.drain()
        assert status == 0, "%s exited with status %s\n%s" % (self, status, self.transcript())
        return self.events

    def kill(self) -> None:
        """SIGTERM, then SIGKILL after 5 s, to the process group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        self._stderr.close()

    def transcript(self) -> str:
        self.drain()
        self._stderr.seek(0)
        events = "\n".join("  %s" % {k: v for k, v in e.items() if k != "_time"}
                           for e in self.events[-40:])
        return "events:\n%s\nstderr:\n%s" % (events, self._stderr.read()[-4000:])

    def __repr__(self) -> str:
        return "<Peer %s on %s %s>" % (os.path.basename(self.args[1]) if len(self.args) > 1
                                       else self.args[0], self.host.name, self.args[2:4])


_LAB_COUNTER = iter(range(1, 1 << 30))


class Lab:
    """Hosts named ``names`` at 10.77.0.1, .2, ... on one bridge.

    Use as a context manager, or call :meth:`close` in a ``finally``.
    """

    def __init__(self, names: tuple[str, ...] = ("head", "worker1", "worker2", "intruder")):
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError("network namespaces unavailable: %s" % reason)
        _remove_stale_namespaces()
        self.prefix = "zc%dn%d" % (os.getpid(), next(_LAB_COUNTER))
        self.switch = "%s-switch" % self.prefix
        self.hosts: dict[str, Host] = {}
        self.peers: list[Peer] = []
        self._namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(names, start=1):
                self._add_host(name, "%s.%d" % (SUBNET, i))
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def _add_host(self, name: str, address: str) -> None:
        host = Host(name, "%s-%s" % (self.prefix, name), address, ("v-" + name)[:15])
        self._add_namespace(host.namespace)
        _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
            "netns", host.namespace)
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        _ip("-n", host.namespace, "addr", "add", address + "/24", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        self.hosts[name] = host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def python(self, host: str, script: str, *args: str,
               env: Optional[dict[str, str]] = None) -> Peer:
        """Run ``python script args...`` (this interpreter) in ``host``."""
        peer = Peer(self.hosts[host], [sys.executable, script, *args], env=env)
        self.peers.append(peer)
        return peer

    def run(self, host: str, *args: str) -> subprocess.CompletedProcess:
        """Run a short command in ``host`` and return its result."""
        return subprocess.run(["ip", "netns", "exec", self.hosts[host].namespace, *args],
                              capture_output=True, text=True, timeout=30)

    def link_down(self, host: str) -> None:
        """Cut ``host``'s cable: its bridge port goes down."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "down")

    def link_up(self, host: str) -> None:
        """Plug ``host``'s cable back in."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "up")

    def close(self) -> None:
        """Kill every process started here, then delete every namespace
        (which deletes their links and the bridge). Idempotent."""
        for peer in self.peers:
            peer.kill()
        self.peers.clear()
        for namespace in reversed(self._namespaces):
            _ip("netns", "del", namespace, check=False)
        self._namespaces.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
