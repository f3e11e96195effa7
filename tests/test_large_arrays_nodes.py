"""Large arrays ventilator -> worker -> sink over ipc: split over several
frames above SPLIT_BYTES, received 64-byte aligned and writeable from
ALIGNED_BYTES up, and every node's ``copied_bytes`` exact."""

import numpy as np
import pytest

import zmq_cluster as zc
from zmq_cluster.protocol import ALIGNED_BYTES, SPLIT_BYTES

from helpers import WAIT_MS, worker_thread

MIB = 1 << 20


class CheckingIdentityWorker(zc.BasicWorker):
    """Returns the request's array itself, after checking it where it ran."""

    seen = None

    def HandleRequest(self, request):
        self.seen = (request.ctypes.data % 64, bool(request.flags.writeable), request.nbytes)
        request[0] = request[0]  # really writeable
        return request


@pytest.fixture
def urls(ipc_url):
    return ipc_url("req"), ipc_url("res"), ipc_url("cmd")


@pytest.mark.parametrize("basic", [False, True], ids=["Ventilator/Sink", "Basic"])
@pytest.mark.parametrize("nbytes", [MIB // 2, 2 * MIB, 64 * MIB + 8],
                         ids=["512KiB", "2MiB", "64MiB+8"])
def test_large_arrays_and_copy_counters_on_the_node_path(ctx, urls, basic, nbytes):
    req, res, cmd = urls
    arr = np.arange(nbytes // 8, dtype=np.float64)
    vent_class, sink_class = (zc.BasicVentilator, zc.BasicSink) if basic else (zc.Ventilator,
                                                                               zc.Sink)
    with vent_class(ctx, zc.Connect(req, bind=True)) as vent, \
            sink_class(ctx, zc.Connect(res, bind=True), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd, CheckingIdentityWorker) as (worker, errors):
        assert vent.Send([arr]) == 1
        [got] = list(sink.Receive(1))
        if basic:
            assert got.status == zc.ClusterResult.STATUS_SUCCESS
            got = got.payload
        worker_copied = worker.copied_bytes
    assert not errors
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable
    big = nbytes >= ALIGNED_BYTES
    mod, writeable, seen_bytes = worker.seen
    assert writeable and seen_bytes == nbytes
    if big:
        assert mod == 0 and got.ctypes.data % 64 == 0
    # Sent: views (a split array's 8-byte last frame is copied into libzmq);
    # received over ipc: a view below ALIGNED_BYTES, else one copy (libzmq
    # never places a frame at 64; a split array is assembled).
    tail = nbytes % SPLIT_BYTES if nbytes > SPLIT_BYTES else 0
    received = nbytes if big else 0
    assert vent.copied_bytes == tail
    assert worker_copied == received + tail
    assert sink.copied_bytes == received
