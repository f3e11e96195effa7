"""Selects the send/receive twin: compiled unless ZMQ_CLUSTER_NO_EXTENSIONS is set.

Both twins provide ``send_message``, ``recv_message``, ``peek_header`` and
the nodes' loops ``run_worker``, ``sink_next`` and ``send_requests``, with
the same behaviour and the same bytes on the wire; see ``_wire_py`` for the
contract.
"""

from ._compat import NO_EXTENSIONS
from ._wire_py import SKIP, STOP, peek_header

if NO_EXTENSIONS:
    from ._wire_py import recv_message, run_worker, send_message, send_requests, sink_next
    FASTPATH = False
else:
    import zmq  # noqa: F401  (loads the libzmq the extension links against)

    from ._fastpath.wire import recv_message, run_worker, send_message, send_requests, sink_next
    FASTPATH = True

__all__ = ["send_message", "recv_message", "peek_header", "run_worker", "sink_next",
           "send_requests", "STOP", "SKIP", "FASTPATH"]
