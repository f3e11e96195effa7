"""Shared fixtures: a zmq context per test, the framing twins to test, and a
keygen directory of CURVE keys."""

import importlib
import itertools
import os
import shutil
import signal
import tempfile

import pytest
import zmq

from zmq_cluster import _framing_py
from zmq_cluster._compat import NO_EXTENSIONS
from zmq_cluster.security import keygen


def _twins():
    twins = [pytest.param(_framing_py, id="py")]
    if not NO_EXTENSIONS:
        # Imported at collection: a missing extension fails the run here.
        twins.append(pytest.param(importlib.import_module("zmq_cluster._fastpath.framing"),
                                  id="cy"))
    return twins


TWINS = _twins()

# Run from a background job, pytest inherits SIGINT ignored, and so would the
# processes the tests start (an ignored signal survives exec): the Ctrl-C
# tests would wait forever. Python's own handler is reset to the default at
# exec, so the children see Ctrl-C as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=TWINS)
def twin(request):
    """A framing module (``encode``/``decode``): each twin in turn."""
    return request.param


@pytest.fixture
def keys(tmp_path):
    """A fresh ``zmq-cluster keygen`` directory (its KeyPaths) under tmp_path/keys."""
    return keygen(tmp_path / "keys")


@pytest.fixture
def ctx():
    """A fresh zmq context, destroyed (linger 0) after the test."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


_IPC_COUNTER = itertools.count()


@pytest.fixture(scope="session")
def _ipc_dir():
    # A short path: ipc:// addresses must fit in sockaddr_un (107 bytes).
    path = tempfile.mkdtemp(prefix="zc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ipc_url(_ipc_dir):
    """A factory of unique ipc:// addresses in a private temporary dir."""
    def make(name="s"):
        return "ipc://%s/%s-%d-%d" % (_ipc_dir, name, os.getpid(), next(_IPC_COUNTER))
    return make


@pytest.fixture(params=["ipc", "tcp", "inproc"])
def pair(request, ctx, ipc_url):
    """A connected (sender PUSH, receiver PULL) pair on each transport."""
    url = {"ipc": ipc_url("pair"), "tcp": "tcp://127.0.0.1:*",
           "inproc": "inproc://pair"}[request.param]
    receiver = ctx.socket(zmq.PULL)
    receiver.bind(url)
    sender = ctx.socket(zmq.PUSH)
    sender.connect(receiver.getsockopt_string(zmq.LAST_ENDPOINT))
    yield sender, receiver
    sender.close(0)
    receiver.close(0)
