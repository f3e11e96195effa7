"""The command channel (kill commands with a subscription handshake) and
the streamer / forwarder devices."""

import threading
import time

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster.protocol import KIND_COMMAND
from zmq_cluster.wire import recv_message

from helpers import WAIT_MS, worker_thread


def _run_in_thread(target, *args):
    out = {}

    def run():
        try:
            out["value"] = target(*args)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_sink_kill_command_ends_a_running_receive(ctx, ipc_url):
    res, cmd = ipc_url("res"), ipc_url("cmd")
    sink = zc.BasicSink(ctx, zc.Connect(res, bind=True), zc.Connect(cmd),
                        receiver_timeout=WAIT_MS)
    sink.Setup()
    try:
        thread, out = _run_in_thread(lambda: list(sink.Receive()))
        seen = zc.BasicSink.SendKillCommand(ctx, zc.Connect(cmd, bind=True), timeout=WAIT_MS)
        thread.join(WAIT_MS / 1000)
        assert not thread.is_alive()
        assert seen == 1 and out == {"value": []}
    finally:
        sink.Shutdown()


def test_kill_waits_for_a_subscriber_that_connects_later(ctx, ipc_url):
    res, cmd = ipc_url("res"), ipc_url("cmd")
    sender, out = _run_in_thread(zc.BasicSink.SendKillCommand, ctx,
                                 zc.Connect(cmd, bind=True), 1, WAIT_MS)
    # The sender is blocked in its handshake until a subscriber appears.
    sender.join(0.2)
    assert sender.is_alive()
    with zc.BasicSink(ctx, zc.Connect(res, bind=True), zc.Connect(cmd),
                      receiver_timeout=WAIT_MS) as sink:
        assert list(sink.Receive()) == []
    sender.join(WAIT_MS / 1000)
    assert out == {"value": 1}


def test_kill_without_subscribers_times_out_and_is_not_sent(ctx, ipc_url):
    start = time.monotonic()
    with pytest.raises(zc.ReceiverTimeoutException, match="no subscriber"):
        zc.BasicWorker.SendKillCommand(ctx, zc.Connect(ipc_url("cmd"), bind=True), timeout=100)
    assert time.monotonic() - start < 5


def test_worker_kill_command_stops_run(ctx, ipc_url):
    req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
    worker = zc.BasicWorker(ctx, zc.Connect(req, bind=True), zc.Connect(res, bind=True),
                            zc.Connect(cmd), receiver_timeout=WAIT_MS)
    thread, out = _run_in_thread(worker.Run)
    assert zc.BasicWorker.SendKillCommand(ctx, zc.Connect(cmd, bind=True),
                                          timeout=WAIT_MS) == 1
    thread.join(WAIT_MS / 1000)
    assert not thread.is_alive() and out == {"value": None}


def test_kill_reaches_every_subscriber(ctx, ipc_url):
    req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
    workers = [zc.BasicWorker(ctx, zc.Connect(req), zc.Connect(res), zc.Connect(cmd),
                              receiver_timeout=WAIT_MS) for _ in range(3)]
    threads = [_run_in_thread(w.Run)[0] for w in workers]
    assert zc.BasicWorker.SendKillCommand(ctx, zc.Connect(cmd, bind=True), num_subscribers=3,
                                          timeout=WAIT_MS) == 3
    for thread in threads:
        thread.join(WAIT_MS / 1000)
        assert not thread.is_alive()


class _CommandLogger(zc.BasicWorker):
    def Setup(self):
        super().Setup()
        self.commands = []

    def HandleCommand(self, command):
        self.commands.append(command)
        return command == "stop please"


def test_custom_commands_go_to_handle_command(ctx, ipc_url):
    req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
    worker = _CommandLogger(ctx, zc.Connect(req, bind=True), zc.Connect(res, bind=True),
                            zc.Connect(cmd), receiver_timeout=WAIT_MS)
    worker.Setup()
    thread, out = _run_in_thread(worker.Run)
    assert zc.BasicWorker.SendKillCommand(ctx, zc.Connect(cmd, bind=True),
                                          command={"op": "reload"}, timeout=WAIT_MS) == 1
    zc.BasicWorker.SendKillCommand(ctx, zc.Connect(cmd, bind=True), command="stop please",
                                   timeout=WAIT_MS)
    thread.join(WAIT_MS / 1000)
    assert not thread.is_alive() and out == {"value": None}
    assert worker.commands == [{"op": "reload"}, "stop please"]


def test_existing_pub_socket_sends_without_handshake(ctx):
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://pubcmd")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect("inproc://pubcmd")
    try:
        # A plain PUB tells nothing of its subscribers; prove the
        # subscription has arrived by a probe the subscriber receives.
        for _ in range(200):
            pub.send(b"probe")
            if sub.poll(50):
                break
        while sub.poll(0):
            sub.recv()
        assert zc.BasicWorker.SendKillCommand(ctx, pub) is None
        assert sub.poll(WAIT_MS)
        assert recv_message(sub)[::2] == (KIND_COMMAND, zc.BasicWorker.CMD_KILL)
    finally:
        pub.close(0)
        sub.close(0)


def test_streamer_device_relays_requests_to_workers(ctx, ipc_url):
    front, back, res, cmd = ipc_url("front"), ipc_url("back"), ipc_url("res"), ipc_url("cmd")
    device_ctx = zmq.Context()
    device, out = _run_in_thread(zc.LaunchStreamerDevice, device_ctx,
                                 zc.Connect(front, bind=True), zc.Connect(back, bind=True))
    try:
        with zc.Ventilator(ctx, zc.Connect(front)) as vent, \
                zc.Sink(ctx, zc.Connect(res, bind=True), receiver_timeout=WAIT_MS) as sink, \
                worker_thread(ctx, back, res, cmd):
            vent.Send([np.arange(3), 7])
            got = list(sink.Receive(2))
        assert sorted(map(repr, got)) == ["14", "array([0, 2, 4])"]
    finally:
        device_ctx.term()  # makes the device return
        device.join(WAIT_MS / 1000)
    assert not device.is_alive() and out == {"value": None}


def test_forwarder_device_fans_commands_out_and_passes_subscriptions_up(ctx, ipc_url):
    front, back = ipc_url("front"), ipc_url("back")
    device_ctx = zmq.Context()
    device, out = _run_in_thread(zc.LaunchForwarderDevice, device_ctx,
                                 zc.Connect(front, bind=True), zc.Connect(back, bind=True))
    sinks = [zc.BasicSink(ctx, zc.Connect(ipc_url("res"), bind=True), zc.Connect(back),
                          receiver_timeout=WAIT_MS) for _ in range(2)]
    try:
        for sink in sinks:
            sink.Setup()
        receivers = [_run_in_thread(lambda s=s: list(s.Receive()))[0] for s in sinks]
        # The sender connects to the device; the sinks' subscriptions reach it
        # through the device, so its handshake sees a subscriber. A sink
        # whose subscription reached the device later than that misses the
        # command: send again until both have stopped.
        deadline = time.monotonic() + WAIT_MS / 1000
        while any(t.is_alive() for t in receivers) and time.monotonic() < deadline:
            assert zc.BasicSink.SendKillCommand(ctx, zc.Connect(front), timeout=WAIT_MS) >= 1
            for thread in receivers:
                thread.join(0.2)
        assert not any(thread.is_alive() for thread in receivers)
    finally:
        for sink in sinks:
            sink.Shutdown()
        device_ctx.term()
        device.join(WAIT_MS / 1000)
    assert not device.is_alive() and out == {"value": None}
