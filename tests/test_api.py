"""Every documented name of glimpse.util.zmq_cluster, with its documented
signature, constants and defaults (reference: shared/reference/zmq_cluster-api.txt)."""

import inspect

import pytest

import zmq_cluster as zc

# name -> documented parameters (self omitted); extra keyword arguments this
# library adds must come after these and have defaults.
DOCUMENTED = {
    "FutureSocket": ["url", "type", "bind", "options"],
    "FutureSocket.MakeSocket": ["context", "url", "type", "bind", "options", "pre_delay",
                                "post_delay"],
    "InitSocket": ["context", "connect_or_socket", "type", "kwargs"],
    "MakeSocket": ["context", "url", "type", "bind", "options"],
    "SocketTypeToString": ["type"],
    "BasicVentilator": ["context", "request_sender", "worker_connect_delay"],
    "BasicVentilator.Send": ["requests"],
    "BasicVentilator.Setup": [],
    "BasicVentilator.Shutdown": [],
    "Ventilator.Send": ["requests", "metadata"],
    "BasicSink": ["context", "result_receiver", "command_receiver", "receiver_timeout"],
    "BasicSink.Receive": ["num_results", "timeout"],
    "BasicSink.SendKillCommand": ["context", "command_sender"],
    "BasicSink.Setup": [],
    "BasicSink.Shutdown": [],
    "Sink.Receive": ["num_results", "timeout", "metadata"],
    "BasicWorker": ["context", "request_receiver", "result_sender", "command_receiver",
                    "receiver_timeout"],
    "BasicWorker.HandleCommand": ["command"],
    "BasicWorker.HandleRequest": ["request"],
    "BasicWorker.Run": [],
    "BasicWorker.SendKillCommand": ["context", "command_sender", "command"],
    "BasicWorker.Setup": [],
    "ClusterRequest": ["payload", "metadata"],
    "ClusterResult": ["status", "payload", "request_metadata", "metadata", "exception"],
    "LaunchStreamerDevice": ["context", "frontend_connect", "backend_connect"],
    "LaunchForwarderDevice": ["context", "frontend_connect", "backend_connect"],
}

DEFAULTS = {
    "FutureSocket": {"url": None, "type": None, "bind": False, "options": None},
    "FutureSocket.MakeSocket": dict.fromkeys(
        ["url", "type", "bind", "options", "pre_delay", "post_delay"]),
    "InitSocket": {"type": None},
    "MakeSocket": {"bind": False, "options": None},
    "BasicVentilator": {"worker_connect_delay": None},
    "Ventilator.Send": {"metadata": None},
    "BasicSink": {"command_receiver": None, "receiver_timeout": None},
    "BasicSink.Receive": {"num_results": None, "timeout": None},
    "Sink.Receive": {"num_results": None, "timeout": None, "metadata": False},
    "BasicWorker": {"command_receiver": None, "receiver_timeout": None},
    "BasicWorker.SendKillCommand": {"command": None},
    "ClusterRequest": {"payload": None, "metadata": None},
    "ClusterResult": dict.fromkeys(["status", "payload", "request_metadata", "metadata",
                                    "exception"]),
}


def _resolve(dotted):
    obj = zc
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("dotted", sorted(DOCUMENTED))
def test_documented_signature(dotted):
    params = list(inspect.signature(_resolve(dotted)).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    documented = DOCUMENTED[dotted]
    assert [p.name for p in params[:len(documented)]] == documented
    for extra in params[len(documented):]:
        assert extra.default is not inspect.Parameter.empty, extra.name
    for name, default in DEFAULTS.get(dotted, {}).items():
        assert inspect.signature(_resolve(dotted)).parameters[name].default == default, name


def test_all_lists_every_documented_name():
    documented = {"FutureSocket", "Connect", "InitSocket", "MakeSocket", "SocketTypeToString",
                  "BasicVentilator", "Ventilator", "BasicSink", "Sink", "BasicWorker",
                  "ClusterRequest", "ClusterResult", "ReceiverTimeoutException",
                  "WorkerException", "LaunchStreamerDevice", "LaunchForwarderDevice"}
    assert documented <= set(zc.__all__)
    for name in zc.__all__:
        assert getattr(zc, name) is not None


def test_static_methods_and_subclasses():
    assert isinstance(inspect.getattr_static(zc.BasicSink, "SendKillCommand"), staticmethod)
    assert isinstance(inspect.getattr_static(zc.BasicWorker, "SendKillCommand"), staticmethod)
    assert issubclass(zc.Sink, zc.BasicSink)
    assert issubclass(zc.Ventilator, zc.BasicVentilator)
    assert issubclass(zc.ReceiverTimeoutException, Exception)
    assert issubclass(zc.WorkerException, Exception)


def test_constants():
    assert zc.BasicSink.CMD_KILL == "CLUSTER_SINK_KILL"
    assert zc.BasicWorker.CMD_KILL == "CLUSTER_WORKER_KILL"
    assert zc.ClusterResult.STATUS_SUCCESS == "OK"
    assert zc.ClusterResult.STATUS_FAIL == "FAIL"
    assert zc.BasicSink.result_receiver is None and zc.BasicSink.command_receiver is None
    assert zc.BasicVentilator.request_sender is None
    assert zc.WorkerException.worker_exception is None


def test_records_keep_their_fields():
    request = zc.ClusterRequest([1], {"m": 1})
    assert (request.payload, request.metadata, request.task_id) == ([1], {"m": 1}, None)
    assert zc.ClusterRequest().payload is None
    error = ValueError("x")
    result = zc.ClusterResult("FAIL", None, {"m": 1}, {"host": "h"}, error)
    assert (result.status, result.payload, result.request_metadata, result.metadata,
            result.exception, result.task_id) == ("FAIL", None, {"m": 1}, {"host": "h"},
                                                  error, None)
    assert "ClusterRequest(payload=[1]" in repr(request)
    assert "status='FAIL'" in repr(result)


def test_worker_exception_carries_the_worker_exception():
    inner = ZeroDivisionError("division by zero")
    exc = zc.WorkerException(worker_exception=inner)
    assert exc.worker_exception is inner and "ZeroDivisionError" in str(exc)
    assert zc.WorkerException("text").worker_exception is None


def test_fastpath_flag_matches_the_environment():
    from zmq_cluster._compat import NO_EXTENSIONS
    assert zc.FASTPATH is (not NO_EXTENSIONS)
