"""Workers: receive task requests, run them, send results."""

import logging
import os
import socket as _socket
import time
import traceback

import zmq

from .commands import send_command
from .exceptions import RemoteError
from .messages import ClusterRequest, ClusterResult
from .protocol import KIND_COMMAND, KIND_REQUEST
from .sockets import InitSocket, close_owned
from .wire import run_worker

__all__ = ["BasicWorker"]

log = logging.getLogger("zmq_cluster")

#: How long a stopping worker waits for its queued results to leave (ms).
RESULT_LINGER_MS = 5000


class BasicWorker:
    """A cluster worker.

    ``request_receiver`` is made a PULL socket, ``result_sender`` a PUSH
    socket and ``command_receiver`` (if any) a SUB socket subscribed to
    everything. :meth:`Run` serves requests until :meth:`HandleCommand`
    returns True; with ``receiver_timeout`` (ms) set, it raises
    ReceiverTimeoutException when neither a request nor a command arrives in
    that time.

    For every request the worker sends one ClusterResult: status OK and the
    handler's return value, or status FAIL and the exception it raised. The
    result carries the request's metadata (``request_metadata``), the
    request's task id, and ``metadata = {"host", "pid", "seconds"}``: the
    node that ran it and the seconds the handler took. A request that breaks
    the wire format is logged and counted in ``malformed_messages``; if its
    header was readable, a FAIL result with the MessageFormatError is sent
    so that nothing waits for it for ever. The worker keeps serving.

    ``allow_pickle`` and ``array_alignment`` are as for BasicSink.

    Counters: ``messages_received`` and ``messages_sent`` (every message,
    commands and malformed ones included), ``copied_bytes`` (payload bytes
    copied on the way in and out: arrays below ``COPY_THRESHOLD``; larger
    arrays travel zero-copy both ways).
    """

    #: Send this to the command socket to shut down the worker.
    CMD_KILL = "CLUSTER_WORKER_KILL"

    allow_pickle = True
    array_alignment = None

    def __init__(self, context, request_receiver, result_sender, command_receiver=None,
                 receiver_timeout=None):
        self.context = context
        self.request_receiver = request_receiver
        self.result_sender = result_sender
        self.command_receiver = command_receiver
        self.receiver_timeout = receiver_timeout
        self.malformed_messages = 0
        self.requests_handled = 0
        self.copied_bytes = 0
        self.messages_sent = 0
        self.messages_received = 0
        self._requests = None
        self._results = None
        self._commands = None
        self._identity = {"host": _socket.gethostname(), "pid": os.getpid()}

    def Setup(self):
        """Initialize the worker: create (or adopt) and connect its sockets."""
        self._requests = InitSocket(self.context, self.request_receiver, zmq.PULL)
        self._results = InitSocket(self.context, self.result_sender, zmq.PUSH)
        if self.command_receiver is not None:
            self._commands = InitSocket(self.context, self.command_receiver, zmq.SUB,
                                        options={zmq.SUBSCRIBE: b""})

    def Shutdown(self):
        """Close the sockets the worker created (Run does this when it ends)."""
        close_owned(self._requests, self.request_receiver)
        # Results already queued still go out: linger a little.
        close_owned(self._results, self.result_sender, linger=RESULT_LINGER_MS)
        close_owned(self._commands, self.command_receiver)
        self._requests = self._results = self._commands = None

    def Run(self):
        """Handle incoming requests, and watch for quit commands.

        Calls :meth:`Setup` first if it was not called, and closes the
        worker's sockets when it returns or raises.
        """
        if self._requests is None:
            self.Setup()
        try:
            run_worker(self)  # zmq_cluster.wire: the loop, compiled or pure
        finally:
            self.Shutdown()

    # The semantic steps of the loop, shared by both twins of run_worker.

    def _command(self, kind, command):
        """A command arrived: True to stop."""
        if kind != KIND_COMMAND:
            self._malformed("command", "message of kind %d on the command channel" % kind)
            return False
        return bool(self.HandleCommand(command))

    def _request(self, kind, request):
        """A request arrived: the ClusterResult to send back, or None."""
        if kind != KIND_REQUEST:
            self._malformed("request", "message of kind %d on the request channel" % kind)
            return None
        if type(request) is ClusterRequest:
            payload, request_metadata = request.payload, request.metadata
        else:
            payload, request_metadata = request, None
        start = time.perf_counter()
        try:
            output = self.HandleRequest(payload)
            result = ClusterResult(ClusterResult.STATUS_SUCCESS, output, request_metadata)
        except Exception as exc:
            result = ClusterResult(ClusterResult.STATUS_FAIL, None, request_metadata,
                                   exception=exc)
        result.metadata = dict(self._identity, seconds=time.perf_counter() - start)
        self.requests_handled += 1
        return result

    def _malformed_request(self, exc):
        """A request broke the wire format (MessageFormatError ``exc``): the
        FAIL result to send back when its header was readable, else None."""
        self._malformed("request", exc)
        if exc.header is not None and exc.header[0] == KIND_REQUEST:
            return ClusterResult(ClusterResult.STATUS_FAIL, None, None,
                                 dict(self._identity, seconds=0.0), exc)
        return None

    def _unsendable(self, result, exc):
        """``result`` could not be encoded (TypeError ``exc``): the FAIL
        result to send instead."""
        failed = result.exception if result.exception is not None else exc
        result.status = ClusterResult.STATUS_FAIL
        result.payload = None
        result.exception = RemoteError("%r could not be sent back: %s\n%s" % (
            failed, exc, "".join(traceback.format_exception(failed))))
        return result

    def _malformed(self, channel, reason):
        self.malformed_messages += 1
        log.warning("worker %s dropped a malformed %s: %s", self._identity, channel, reason)

    def HandleRequest(self, request):
        """Event handler for an incoming task request.

        Receives the request's payload (the ClusterRequest's ``payload``, or
        the object itself when a BasicVentilator sent a bare object) and
        returns the output to send back. Override it; this default returns
        the payload unchanged. An exception it raises is sent back as a FAIL
        result.
        """
        return request

    def HandleCommand(self, command):
        """Event handler for an incoming command.

        Returns True to stop the worker. The default stops on
        :attr:`CMD_KILL` and ignores every other command.
        """
        return command == self.CMD_KILL

    @staticmethod
    def SendKillCommand(context, command_sender, command=None, num_subscribers=1,
                        timeout=None):
        """Send a kill command to all workers on a given channel.

        The command is sent once a subscriber is known to be connected (see
        :func:`zmq_cluster.commands.send_command` for ``num_subscribers`` and
        ``timeout``), not after a fixed sleep.

        :param command_sender: (socket-like) The channel on which to send the
           command.
        :param command: Message to send to workers. Defaults to CMD_KILL.
        """
        if command is None:
            command = BasicWorker.CMD_KILL
        return send_command(context, command_sender, command, num_subscribers, timeout)
