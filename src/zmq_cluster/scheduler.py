"""The scheduler: one ROUTER socket, a ledger of every task, credit, liveness
and re-dispatch.

Pool clients and pool workers connect to the scheduler's one listen address
and say who they are in a HELLO (see :mod:`zmq_cluster.schedproto`). Clients
send batches of tasks; the scheduler queues them per client and hands them
to workers by credit: each worker says how many tasks (and bytes of
arguments) it is ready to hold, and updates the count with every batch of
results as its measured task time changes. The ledger records which worker
holds each task and since when. When a worker's connection closes (killed,
stopped past the heartbeat timeout, cut off), its tasks go back to the front
of their queues and run elsewhere; a result from a worker that no longer
holds the task (declared dead, then back) is dropped by task id, so each
result reaches its client once. Argument and result frames pass through
without being decoded or copied.

Run it with ``Scheduler(listen).run()`` or
``python -m zmq_cluster._start scheduler --listen ADDRESS``.
"""

import logging
import time
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import schedproto as sp
from .config import check_endpoint
from .ledger import Ledger, _Client, _Worker
from .liveness import FdMap, heartbeat_options
from .security import CurveAuthenticator, ServerSecurity, authenticator_for
from .trust import (
    EndpointKind, check_listen, classify_endpoint, describe_peer, is_private_ipc,
    sender_is_local, sender_may_pickle,
)
from .wire import recv_any, send_frames

__all__ = ["Scheduler", "is_local_address"]

log = logging.getLogger("zmq_cluster.scheduler")

#: Messages read in a row before the scheduler dispatches.
DRAIN_BATCH = 256
#: Messages handled, at most, before a disconnection is (see _settle).
MAX_SETTLE = 100_000
#: How long a scheduler told to shut down waits for its workers to leave.
SHUTDOWN_SECONDS = 2.0
#: STATS requests a client may have waiting for workers to join, at most.
MAX_STATS_WAITING = 16


def is_local_address(address: str) -> bool:
    """Whether ``address`` reaches only this host (ipc, inproc, loopback tcp)."""
    return classify_endpoint(address) is not EndpointKind.NETWORK


class Scheduler:
    """A scheduler listening on ``listen`` (``tcp://host:port``, ``ipc://path``).

    ``security``: a :class:`~zmq_cluster.security.ServerSecurity` (the
    scheduler's key pair and the directory of public keys it admits): every
    connection is encrypted (CURVE) and a ZAP handler on the scheduler's
    context admits only the authorized keys, refusing others at the
    handshake. **Secure by default on a network**: listening on a
    non-loopback TCP address (``0.0.0.0``, ``*``, any address outside
    127.0.0.0/8 and ::1) without ``security`` raises
    :class:`~zmq_cluster.trust.InsecureListenError`, from Python as from the
    command line, unless ``insecure=True`` (then a warning is logged:
    anyone who can reach the port can run any importable function). ipc://
    and loopback addresses need no keys.

    ``heartbeat_timeout`` (seconds): a worker whose connection carries no
    ZMTP heartbeat for that long is declared dead. ``trusted``: whether
    peers may send pickled functions and arguments (forwarded to workers and
    clients as a per-batch flag). None (the default) decides per connection,
    at its HELLO, by :func:`zmq_cluster.trust.sender_may_pickle`:
    CURVE-authenticated peers, loopback peers, and ipc peers when the
    socket's directory is private (as LocalCluster's) are trusted; other
    network peers are not (``--insecure`` included).
    ``socket_options``: extra options for the ROUTER socket.

    ``inproc``: an ``inproc://`` endpoint the ROUTER also binds, for
    clients in this process (on ``context``, which inproc needs shared:
    LocalCluster runs the scheduler as a thread this way). Such a peer is
    in this process, so it is trusted (it has no ``Peer-Address``); it
    hears no disconnection, so when the scheduler stops it tells each such
    client with a RESET (body ``schedproto.RESET_STOPPED``).
    ``run()`` serves until a SHUTDOWN message, :meth:`stop`, or SIGTERM.
    """

    def __init__(self, listen: str, *, heartbeat_timeout: float = 10.0,
                 security: Optional[ServerSecurity] = None, insecure: bool = False,
                 trusted: Optional[bool] = None,
                 socket_options: Optional[Dict[int, Any]] = None,
                 context: Optional[zmq.Context] = None,
                 inproc: Optional[str] = None) -> None:
        if inproc is not None and not inproc.startswith("inproc://"):
            raise ValueError("inproc must be an inproc:// endpoint, not %r" % (inproc,))
        if not (isinstance(listen, str) and listen.startswith("inproc://")):
            try:
                check_endpoint(listen, listen=True)
            except (TypeError, ValueError) as exc:
                raise ValueError("listen must be %s (or inproc://NAME), not %r"
                                 % (exc, listen)) from None
        self.listen = listen
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.trusted = trusted
        self.security = security
        opts: Dict[Any, Any] = {zmq.ROUTER_MANDATORY: 1, zmq.SNDHWM: 0, zmq.RCVHWM: 0, zmq.LINGER: 0}
        opts.update(heartbeat_options(self.heartbeat_timeout))
        opts.update(socket_options or {})
        if opts.get(zmq.CURVE_SERVER) and security is None:
            raise ValueError("CURVE keys go in security=ServerSecurity(...) (which also starts"
                             " the ZAP handler that admits only authorized keys), not in"
                             " socket_options")
        # Refuse (or warn) before anything is made: zmq_cluster.trust's rule.
        warning = check_listen(listen, secure=security is not None, insecure=insecure)
        if warning:
            log.warning("%s", warning)
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._auth: Optional[CurveAuthenticator] = None
        self._own_auth = False
        try:
            if security is not None:
                self._auth = authenticator_for(self._ctx)
                if self._auth is None:
                    self._auth = security.start_authenticator(self._ctx)
                    self._own_auth = True
            self._router = self._ctx.socket(zmq.ROUTER)
            for opt, value in opts.items():
                self._router.setsockopt(opt, value)
            if security is not None:
                security.apply(self._router)
            self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._router.bind(listen)
            self.address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            if inproc is not None:
                self._router.bind(inproc)
        except BaseException:
            self._close_partial()
            raise
        #: The inproc endpoint also bound, or None.
        self.inproc = inproc
        self._has_inproc = inproc is not None or self.address.startswith("inproc://")
        # Routing ids of the clients connected over inproc (told when we stop).
        self._inproc_clients: Dict[bytes, None] = {}
        self._private_ipc = is_private_ipc(self.address)
        self._curve: Literal["server", None] = "server" if security is not None else None

        self._running = True      # until stop()
        self._stopping: Optional[float] = None  # deadline once told to shut down
        self._peers: Dict[bytes, Tuple[str, Any]] = {}  # routing id -> (role, peer)
        self._fdmap = FdMap()
        self._settling = False
        self._drained = bytearray(2)
        # STATS requests waiting for enough workers.
        self._stats_waiting: List[Tuple[_Client, Dict[Any, Any]]] = []
        self._next_client = 1
        self._next_worker = 1
        self.ledger = Ledger(self._send)
        #: Counts of what happened (malformed messages, late results...).
        self.counters = self.ledger.counters

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        """Serve until stopped; closes the sockets on the way out. A
        :meth:`stop` that came before ``run()`` makes it return at once."""
        probe_every = max(0.05, self.heartbeat_timeout / 2)
        next_probe = time.monotonic() + probe_every
        # Connection events, then the router; waiting and receiving happen
        # in zmq_cluster.wire (without the GIL in the compiled twin). The
        # monitor is looked at once per batch (first=0), not after every
        # message of a batch (first=1): a try on an empty socket costs
        # about 0.7 us.
        sockets = [self._monitor, self._router]
        # Which are known drained (see wire.recv_any): every send on the
        # router (_send) and every other read clears its entry.
        drained = self._drained
        ledger = self.ledger
        try:
            handle = self._handle
            while self._running:
                now = time.monotonic()
                wait = next_probe - now
                if ledger.timed:
                    wait = min(wait, ledger.next_deadline(now) - now)
                got = recv_any(sockets, max(0, min(100, int(wait * 1000) + 1)), 0, None,
                               drained)
                n = 0
                while got is not None:
                    which, frames = got
                    if which == 1:
                        handle(frames)
                    else:
                        self._monitor_event(frames)
                    n += 1
                    if n >= DRAIN_BATCH:
                        break
                    got = recv_any(sockets, 0, 1, None, drained)
                if ledger.active:
                    ledger.dispatch()
                now = time.monotonic()
                if now >= next_probe:
                    self._probe()
                    next_probe = now + probe_every
                if ledger.timed:
                    for worker in ledger.timed_out(now):
                        # The worker cannot answer while the task holds it;
                        # it ends itself (SIGALRM) and a nanny replaces it.
                        self._send(worker.rid, sp.message(sp.STOP))
                        self._gone(worker.rid, "task timed out")
                if self._stopping is not None and (not ledger.workers or now > self._stopping):
                    break
        finally:
            self._tell_inproc_clients()
            self.close()

    def _tell_inproc_clients(self) -> None:
        reset = sp.message(sp.RESET, sp.RESET_STOPPED)
        for rid in list(self._inproc_clients):
            if rid in self._peers:
                try:
                    send_frames(self._router, [rid] + reset, zmq.DONTWAIT)
                except zmq.ZMQError:
                    pass
        self._inproc_clients.clear()

    def stop(self) -> None:
        """Make :meth:`run` return (from a signal handler or another thread)."""
        self._running = False

    def close(self) -> None:
        """Close the sockets (run() does this when it returns)."""
        self._close_partial()

    def _close_partial(self) -> None:
        # Told to shut down, what is queued (the answer to the stop, the
        # workers' STOPs) gets a moment to leave; otherwise nothing waits.
        linger = int(SHUTDOWN_SECONDS * 1000) if getattr(self, "_stopping", None) else 0
        if getattr(self, "_monitor", None) is not None and not self._router.closed:
            # Before its reading end goes: libzmq's I/O thread would block
            # for good sending a late event to a closed monitor.
            self._router.disable_monitor()
        for name in ("_router", "_monitor"):
            sock = getattr(self, name, None)
            if sock is not None:
                try:
                    sock.close(linger=linger if name == "_router" else 0)
                except zmq.ZMQError:
                    pass
        # The ZAP handler goes only after the CURVE socket is closed: libzmq
        # admits every client on a context without one.
        if self._auth is not None and self._own_auth:
            self._auth.stop()
            self._own_auth = False
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    def _send(self, rid: bytes, frames: List[Any]) -> bool:
        """Send to a peer: False (and the peer declared gone) when its
        connection no longer exists."""
        # Never block: with ROUTER_MANDATORY and no high-water mark, a pipe
        # that cannot take a message is one libzmq is tearing down.
        try:
            send_frames(self._router, [rid] + frames, zmq.DONTWAIT)
            self._drained[1] = 0
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self._gone(rid, "unreachable")
                return False
            raise

    # ------------------------------------------------------------ messages

    def _handle(self, frames: List[Any]) -> None:
        rid = frames[0]  # bytes (recv_any)
        try:
            if len(frames) < 3:
                raise sp.ProtocolError("%d frames" % len(frames))
            mtype, count, flags = sp.parse_ctl(frames[1].bytes)
            peer = self._peers.get(rid)
            if mtype == sp.HELLO:
                self._hello(rid, frames)
            elif peer is None:
                self.counters["unknown_peer"] += 1
                if mtype != sp.BYE:
                    self._send(rid, sp.message(sp.RESET))
            elif peer[0] == "closing":
                self._closing(rid, peer[1], mtype)
            elif mtype == sp.RESULTS and peer[0] == "worker":
                self.ledger.results(peer[1], frames, count, flags)
            elif mtype == sp.TASKS and peer[0] in ("submit", "client"):
                self.ledger.add_tasks(peer[1], frames, count)
            elif mtype == sp.FUNC and peer[0] in ("submit", "client"):
                self.ledger.add_function(frames)
            elif mtype == sp.CANCEL and peer[0] in ("submit", "client"):
                self.ledger.cancel(peer[1], sp.parse_body(frames[2].bytes))
            elif mtype == sp.STATS:
                self._stats(peer[1], sp.parse_body(frames[2].bytes))
            elif mtype == sp.BYE:
                # A client says BYE on its submit connection, after what it
                # sent there (CANCEL, SHUTDOWN): the whole client leaves.
                self._gone(peer[1].rid if peer[0] == "submit" else rid, "said BYE")
            elif mtype == sp.SHUTDOWN and peer[0] in ("submit", "client"):
                if not peer[1].trusted:
                    raise sp.ProtocolError("SHUTDOWN from an untrusted client")
                self._shutdown()
            elif mtype == sp.CONTROL and peer[0] in ("submit", "client"):
                self._control(peer[1], sp.parse_body(frames[2].bytes))
            elif mtype == sp.LEASE and peer[0] in ("submit", "client"):
                self._lease(peer[1], sp.parse_body(frames[2].bytes))
            elif mtype == sp.DIRECT and peer[0] == "worker":
                self.ledger.direct_done(peer[1], sp.parse_body(frames[2].bytes))
            else:
                raise sp.ProtocolError("%s from a %s" % (sp.TYPE_NAMES[mtype], peer[0]))
            if peer is not None and peer[0] == "worker":
                peer[1].last_seen = time.monotonic()
        except Exception as exc:  # whatever a peer sends, the scheduler goes on
            self.counters["malformed"] += 1
            why = str(exc) if isinstance(exc, sp.ProtocolError) else "%s: %s" % (
                type(exc).__name__, exc)
            log.warning("scheduler rejected a malformed message from %s: %s",
                        _who(frames, rid), why)
            peer = self._peers.get(rid)
            if peer is not None and peer[0] == "worker":
                # Its tasks would wait for results that cannot be read:
                # they run elsewhere, and the worker must say HELLO again.
                self._send(rid, sp.message(sp.RESET))
                self._gone(rid, "sent a malformed message")

    def _hello(self, rid: bytes, frames: List[Any]) -> None:
        hello = sp.parse_body(frames[2].bytes)
        if type(hello) is not dict:
            raise sp.ProtocolError("HELLO body is not a dict")
        sp.check_hello(hello)
        if rid in self._peers:
            self._gone(rid, "said HELLO again")
        try:
            fd = frames[2].get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = None  # inproc: a peer in this process, told when we stop
        if fd is not None:
            # Connection events first: libzmq queues a connection's
            # DISCONNECTED before it closes the descriptor, so one that this
            # HELLO's descriptor number was reused from is in the monitor's
            # pipe already, but the loop reads the router first.
            self._drain_monitor()
            old = self._fdmap.hello(fd, rid)
            if old is not None:
                self._gone(old, "its descriptor was reused")
        trusted = self._trust(frames[2])
        if not trusted and self.counters["untrusted_peers"] < 1 << 62:
            self.counters["untrusted_peers"] += 1
        role = hello.get("role")
        now = time.monotonic()
        client: Optional[_Client]
        if role == sp.ROLE_WORKER:
            worker = _Worker(rid, self._next_worker, hello, trusted, now)
            self._next_worker += 1
            self._peers[rid] = ("worker", worker)
            self.ledger.workers[rid] = worker
            self._send(rid, sp.message(sp.WELCOME, {"worker_no": worker.no}))
            log.info("worker %d joined (%s pid %d)", worker.no, worker.host, worker.pid)
            waiting, self._stats_waiting = self._stats_waiting, []
            for client, request in waiting:
                if self.ledger.clients.get(client.no) is client:
                    self._stats(client, request)
        elif role == sp.ROLE_CLIENT:
            client = _Client(rid, self._next_client, hello, trusted,
                             local=sender_is_local(frames[2]))
            self._next_client += 1
            self.ledger.clients[client.no] = client
            self._peers[rid] = ("client", client)
            if fd is None:
                self._inproc_clients[rid] = None
            self._send(rid, sp.message(sp.WELCOME, {"client_no": client.no,
                                                    "workers": len(self.ledger.workers)}))
        elif role == sp.ROLE_SUBMIT:
            # check_hello: an int when present; None (absent) is no client's.
            client = self.ledger.clients.get(cast(int, hello.get("client_no")))
            if client is None:
                raise sp.ProtocolError("submit connection for unknown client")
            self._peers[rid] = ("submit", client)
            # Tasks arrive on this connection: both must be trusted.
            client.trusted = client.trusted and trusted
            client.local = client.local and sender_is_local(frames[2])
        else:
            self._fdmap.forget(rid)
            raise sp.ProtocolError("HELLO with role %r" % (role,))

    def _trust(self, frame: zmq.Frame) -> bool:
        """Whether the sender of ``frame`` may send pickles (see __init__)."""
        if self.trusted is not None:
            return bool(self.trusted)
        return sender_may_pickle(frame, curve=self._curve, private_ipc=self._private_ipc,
                                 inproc=self._has_inproc)

    def _stats(self, client: _Client, request: Any) -> None:
        if type(request) is not dict:
            raise sp.ProtocolError("STATS body is not a dict")
        ledger = self.ledger
        wait = request.get("wait_workers", 0)
        rid = request.get("id")
        if type(wait) is not int or (rid is not None and type(rid) is not int):
            raise sp.ProtocolError("STATS request of the wrong form")
        if len(ledger.workers) < wait:
            mine = [w for w in self._stats_waiting if w[0] is client]
            if len(mine) >= MAX_STATS_WAITING:
                raise sp.ProtocolError("more than %d STATS requests waiting" % MAX_STATS_WAITING)
            self._stats_waiting.append((client, request))
            return
        workers = ledger.worker_stats(time.monotonic())
        queued = sum(len(c.queue) for c in ledger.clients.values())
        running = sum(len(w.inhand) for w in ledger.workers.values())
        counters = dict(self.counters)
        if self._auth is not None:
            counters["curve_accepted"] = self._auth.accepted
            counters["curve_refused"] = self._auth.refused
        self._send(client.rid, sp.message(sp.STATS, {
            "id": rid, "workers": workers, "queued": queued, "running": running,
            "clients": len(ledger.clients), "counters": counters,
            "secure": self.security is not None}))

    def _lease(self, client: _Client, request: Any) -> None:
        """A LEASE request: grant the client a worker's direct socket (a
        client on this host only: a worker's direct address is a loopback
        or ipc one), or say there is none (``worker_no`` None)."""
        if type(request) is not dict or not (request.get("id") is None
                                             or type(request.get("id")) is int):
            raise sp.ProtocolError("LEASE request of the wrong form")
        # "again": whether asking later may help (a client on this host,
        # once a worker that offers a direct socket has joined).
        grant: Dict[str, Any] = {"id": request.get("id"), "worker_no": None,
                                 "again": client.local}
        worker = self.ledger.lease(client) if client.local else None
        if worker is not None:
            assert worker.direct is not None and worker.direct_key is not None
            grant.update(worker_no=worker.no, pid=worker.pid, address=worker.direct,
                         token=sp.lease_token(worker.direct_key, client.no, client.trusted),
                         trusted=worker.trusted, client_trusted=client.trusted)
        self._send(client.rid, sp.message(sp.LEASE, grant))

    def _control(self, client: _Client, request: Any) -> None:
        """A CONTROL request (the command line's stop, stop --workers-only,
        restart-workers): answered at once with the number of workers told."""
        if type(request) is not dict or request.get("op") not in sp.CONTROL_OPS:
            raise sp.ProtocolError("CONTROL request of the wrong form")
        op = request["op"]
        reply = {"id": request.get("id") if type(request.get("id")) is int else None,
                 "op": op, "workers": len(self.ledger.workers)}
        if not client.trusted:
            # Stopping the cluster is for its owners: authenticated or local.
            self.counters["control_refused"] += 1
            log.warning("scheduler refused %r from untrusted client %d (%s pid %d)",
                        op, client.no, client.host, client.pid)
            reply.update(ok=False, error="only an authenticated (CURVE) or local client may %s;"
                         " connect with keys, or from the scheduler's host through"
                         " 127.0.0.1" % op.replace("-", " "))
            self._send(client.rid, sp.message(sp.CONTROL, reply))
            return
        reply["ok"] = True
        log.info("scheduler: %s (asked by client %d, %s pid %d)", op, client.no, client.host,
                 client.pid)
        self._send(client.rid, sp.message(sp.CONTROL, reply))
        if op == sp.OP_STOP:
            self._shutdown()
        else:
            stop = sp.message(sp.STOP, {"restart": op == sp.OP_RESTART_WORKERS})
            for worker in list(self.ledger.workers.values()):
                self._send(worker.rid, stop)

    def _shutdown(self) -> None:
        """Stop every worker, then leave once they have gone (at most
        SHUTDOWN_SECONDS later)."""
        for worker in list(self.ledger.workers.values()):
            self._send(worker.rid, sp.message(sp.STOP))
        self._stopping = time.monotonic() + SHUTDOWN_SECONDS

    # ------------------------------------------------------------ liveness

    def _monitor_event(self, frames: Sequence[Any]) -> None:
        event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])
        if event["event"] == zmq.EVENT_DISCONNECTED:
            rid = self._fdmap.disconnected(event["value"])
            if rid is not None:
                self._settle()
                self._gone(rid, "disconnected")

    def _settle(self) -> None:
        """Handle what the router holds before a disconnection: a peer's
        last messages (a client's SHUTDOWN and BYE just before it closes)
        reach the router before libzmq reports the close, but the loop
        reads connection events first."""
        if self._settling:
            return
        self._settling = True
        try:
            self._drained[1] = 0
            for _ in range(MAX_SETTLE):
                got = recv_any([self._router], 0)
                if got is None:
                    return
                self._handle(got[1])
        finally:
            self._settling = False

    def _drain_monitor(self) -> None:
        self._drained[0] = 0
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._monitor_event(frames)

    def _probe(self) -> None:
        probe = sp.message(sp.PROBE)
        for rid, (role, _) in list(self._peers.items()):
            if role not in ("submit", "closing") and rid in self._peers:
                self._send(rid, probe)

    def _gone(self, rid: bytes, why: str) -> None:
        """A peer left or was declared dead: re-dispatch what it held."""
        peer = self._peers.pop(rid, None)
        self._fdmap.forget(rid)
        self._inproc_clients.pop(rid, None)
        if peer is None:
            return
        role, obj = peer
        if role == "closing":
            return
        self.counters["%s gone: %s" % (role, why)] += 1
        if role == "worker":
            self.ledger.worker_gone(obj, why, died=why in _DEATHS)
        elif role == "client":
            self.ledger.client_gone(obj)
            for other, (r, o) in list(self._peers.items()):
                if r == "submit" and o is obj:
                    if why == "disconnected":
                        # The client's two connections are not ordered with
                        # each other: what it sent on its submit connection
                        # before closing both (SHUTDOWN, BYE) may arrive after
                        # the result connection's close. Keep hearing it.
                        self._peers[other] = ("closing", obj)
                    else:
                        self._peers.pop(other)
                        self._fdmap.forget(other)

    def _closing(self, rid: bytes, client: Any, mtype: int) -> None:
        """A message on the submit connection of a client whose result
        connection has closed: SHUTDOWN (from a trusted client) and BYE are
        honoured; anything else has nobody to answer and is refused with a
        reason (counted, logged, RESET)."""
        if mtype == sp.SHUTDOWN and client.trusted:
            self._shutdown()
        elif mtype == sp.BYE:
            self._gone(rid, "said BYE")
        else:
            self.counters["from a gone client"] += 1
            log.warning("scheduler refused %s from client %d: its result connection has closed",
                        sp.TYPE_NAMES.get(mtype, mtype), client.no)
            self._send(rid, sp.message(sp.RESET))


#: Why a worker may be gone that mean it died (its connection closed or
#: vanished), as opposed to leaving alive.
_DEATHS = frozenset(["disconnected", "unreachable", "its descriptor was reused"])


def _who(frames: Sequence[Any], rid: bytes) -> str:
    """The sender of a message, for a log line."""
    for frame in frames[1:]:
        if isinstance(frame, zmq.Frame):
            return "%s (routing id %s)" % (describe_peer(frame), rid.hex())
    return "routing id %s" % rid.hex()
