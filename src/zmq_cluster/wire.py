"""Selects the wire twin: compiled unless ZMQ_CLUSTER_NO_EXTENSIONS is set.

Both twins provide the primitives ``send_message``, ``recv_message``,
``recv_any``, ``decode_message``, ``send_frames``, the loops
``run_worker``, ``sink_next``, ``receive_results``, ``send_requests``, and
``Counters`` (a node's counters, bumped in C by the compiled loops), with
the same behaviour and the same bytes on the wire;
``zmq_cluster._wire_common`` states their contract and holds what both
share (``STOP``, ``peek_header``...).
"""

from typing import TYPE_CHECKING

from ._compat import NO_EXTENSIONS
from ._wire_common import STOP, is_command, peek_header, timeout_ms

# Type checkers read the pure twin: the compiled one has the same signatures
# (the contract in _wire_common), so no stub repeats them.
if TYPE_CHECKING or NO_EXTENSIONS:
    from ._wire_py import (
        Counters, decode_message, receive_results, recv_any, recv_message, run_worker,
        send_frames, send_message, send_requests, sink_next,
    )
    FASTPATH = False
else:
    import zmq  # noqa: F401  (loads the libzmq the extension links against)

    from ._fastpath.wire import (
        Counters, decode_message, receive_results, recv_any, recv_message, run_worker,
        send_frames, send_message, send_requests, sink_next,
    )
    FASTPATH = True

__all__ = ["send_message", "recv_message", "recv_any", "decode_message", "send_frames",
           "run_worker", "sink_next", "receive_results", "send_requests", "Counters", "STOP",
           "peek_header", "timeout_ms", "is_command", "FASTPATH"]
