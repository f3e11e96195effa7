"""zmq_cluster: spread work over a cluster of machines with ZeroMQ, shipping
numpy arrays between nodes without pickling them.

The API mirrors ``glimpse.util.zmq_cluster``. In it a type is *socket-like*
if it is either a ``zmq.Socket`` or a :class:`FutureSocket`.

``FASTPATH`` is True when the compiled (Cython) modules are in use; set
``ZMQ_CLUSTER_NO_EXTENSIONS=1`` before import to use the pure-Python twins.
"""

from .devices import LaunchForwarderDevice, LaunchStreamerDevice
from .exceptions import (
    EncodeError, HandshakeRefused, MessageFormatError, ReceiverTimeoutException, RemoteError,
    RemoteTraceback, WorkerException,
)
from .framing import FASTPATH
from .local import LocalCluster
from .messages import ClusterRequest, ClusterResult
from .pool import ClusterPool
from .poolworker import run_worker
from .scheduler import Scheduler
from .sink import BasicSink, Sink
from .sockets import Connect, FutureSocket, InitSocket, MakeSocket, SocketTypeToString
from .ventilator import BasicVentilator, Ventilator
from .worker import BasicWorker

__version__ = "0.1.0"

__all__ = [
    "BasicSink",
    "BasicVentilator",
    "BasicWorker",
    "ClusterPool",
    "ClusterRequest",
    "ClusterResult",
    "Connect",
    "EncodeError",
    "FASTPATH",
    "FutureSocket",
    "HandshakeRefused",
    "InitSocket",
    "LaunchForwarderDevice",
    "LaunchStreamerDevice",
    "LocalCluster",
    "MakeSocket",
    "MessageFormatError",
    "ReceiverTimeoutException",
    "RemoteError",
    "RemoteTraceback",
    "Scheduler",
    "Sink",
    "SocketTypeToString",
    "Ventilator",
    "WorkerException",
    "run_worker",
]
