"""Sinks: collect results from worker nodes."""

import logging

import zmq

from .commands import send_command
from .exceptions import WorkerException
from .messages import ClusterResult
from .sockets import InitSocket, close_owned
from .wire import SKIP, STOP, sink_next

__all__ = ["BasicSink", "Sink"]

log = logging.getLogger("zmq_cluster")


class BasicSink:
    """Collect results from worker nodes on the cluster.

    ``result_receiver`` is made a PULL socket, ``command_receiver`` (if any) a
    SUB socket subscribed to everything. ``receiver_timeout`` (ms) is the
    default wait per result for :meth:`Receive`; None waits for ever.

    A message that breaks the wire format is logged, counted in
    ``malformed_messages``, and skipped; the sink keeps serving.
    ``allow_pickle`` (default True) can be set False to refuse pickled values
    from peers that are not trusted; ``array_alignment`` (default None: each
    dtype's own alignment) can be set to e.g. 64 to get every array at that
    alignment, copying those that the transport did not place there.

    Counters: ``messages_received`` (every message, commands and malformed
    ones included), ``messages_sent`` (always 0) and ``copied_bytes``
    (payload bytes copied on the way in: arrays below ``COPY_THRESHOLD``;
    larger arrays are views on the received frames).
    """

    #: Send this to the command socket to shut down the sink.
    CMD_KILL = "CLUSTER_SINK_KILL"

    #: (socket-like, required) Constructor for the reader socket.
    result_receiver = None
    #: (socket-like, optional) Constructor for the command socket.
    command_receiver = None

    allow_pickle = True
    array_alignment = None

    def __init__(self, context, result_receiver, command_receiver=None, receiver_timeout=None):
        self.context = context
        self.result_receiver = result_receiver
        self.command_receiver = command_receiver
        self.receiver_timeout = receiver_timeout
        self.malformed_messages = 0
        self.copied_bytes = 0
        self.messages_sent = 0
        self.messages_received = 0
        self._results = None
        self._commands = None
        self._poller = None

    def Setup(self):
        """Initialize the sink: create (or adopt) and connect its sockets."""
        self._results = InitSocket(self.context, self.result_receiver, zmq.PULL)
        self._poller = zmq.Poller()
        self._poller.register(self._results, zmq.POLLIN)
        if self.command_receiver is not None:
            self._commands = InitSocket(self.context, self.command_receiver, zmq.SUB,
                                        options={zmq.SUBSCRIBE: b""})
            self._poller.register(self._commands, zmq.POLLIN)

    def Shutdown(self):
        """Shutdown the sink: close the sockets it created."""
        close_owned(self._results, self.result_receiver)
        close_owned(self._commands, self.command_receiver)
        self._results = self._commands = self._poller = None

    def __enter__(self):
        self.Setup()
        return self

    def __exit__(self, *exc_info):
        self.Shutdown()

    def Receive(self, num_results=None, timeout=None):
        """Get an iterator over the set of result objects.

        Results will be available on the iterator as they arrive at the
        sink. The iterator ends after ``num_results`` results (if given) or
        when a kill command arrives on the command socket. It raises a
        ReceiverTimeoutException if no result arrives within ``timeout`` ms
        (default: ``receiver_timeout``; None waits for ever). Calls
        :meth:`Setup` first if it was not called.

        :param int num_results: Return after a fixed number of results have
           arrived.
        :param int timeout: Time to wait for each result (in milliseconds).
        :rtype: iterator
        """
        if self._poller is None:
            self.Setup()
        if timeout is None:
            timeout = self.receiver_timeout
        received = 0
        while num_results is None or received < num_results:
            result = sink_next(self, timeout)  # zmq_cluster.wire: compiled or pure
            if result is STOP:
                return
            received += 1
            yield result

    # The semantic steps of sink_next, shared by both of its twins.

    def _check(self, kind, obj, expected_kind):
        """``obj`` when its kind is the channel's, else SKIP (dropped)."""
        if kind != expected_kind:
            self.malformed_messages += 1
            log.warning("sink dropped a message of kind %d on a channel for kind %d",
                        kind, expected_kind)
            return SKIP
        return obj

    def _malformed_message(self, exc):
        """A message broke the wire format: dropped (returns SKIP)."""
        self.malformed_messages += 1
        log.warning("sink dropped a malformed message: %s", exc)
        return SKIP

    def _is_kill(self, command):
        return command == self.CMD_KILL

    @staticmethod
    def SendKillCommand(context, command_sender, num_subscribers=1, timeout=None):
        """Send the quit command to the sink.

        A running :meth:`Receive` on a sink subscribed to this channel ends.
        The command is sent once a subscriber is known to be connected (see
        :func:`zmq_cluster.commands.send_command` for ``num_subscribers`` and
        ``timeout``), not after a fixed sleep.

        :param command_sender: (socket-like) Channel on which to send the
           command.
        """
        return send_command(context, command_sender, BasicSink.CMD_KILL, num_subscribers,
                            timeout)


class Sink(BasicSink):
    """A sink for task results on the cluster: unwraps ClusterResult records."""

    def Receive(self, num_results=None, timeout=None, metadata=False):
        """Get an iterator over the set of results sent to this sink.

        Yields each result's payload, or with ``metadata=True`` a tuple
        ``(payload, request_metadata, result_metadata)``. A result whose
        status is FAIL raises WorkerException, whose ``worker_exception`` is
        the exception raised in the worker; results after it can still be
        read with another call to Receive.

        :param int num_results: Return after a fixed number of results have
           arrived.
        :param int timeout: Time to wait for each result (in milliseconds).
        :param bool metadata: Whether to return (request and result) metadata
           with each result.
        """
        for result in BasicSink.Receive(self, num_results, timeout):
            if type(result) is not ClusterResult:
                raise TypeError("Sink received a %s, not a ClusterResult; use BasicSink for "
                                "raw results" % type(result).__name__)
            if result.status == ClusterResult.STATUS_FAIL:
                raise WorkerException(worker_exception=result.exception)
            if metadata:
                yield result.payload, result.request_metadata, result.metadata
            else:
                yield result.payload

