"""Where libzmq places a received frame's data: address mod 64 and mod 4096.

Sends frames of several sizes over ipc://, tcp://127.0.0.1 and inproc://,
receives them with copy=False, and prints each received frame's address
modulo 64 and 4096 (and the sent buffer's, for inproc, where the frame is
the sender's memory). This is the measurement behind the alignment rule in
docs/protocol.md and the README.

    python benchmarks/frame_alignment.py
"""

import tempfile

import numpy as np
import zmq

SIZES = [100, 1000, 8000, 100_000, 1 << 20, 64 << 20]


def main():
    ctx = zmq.Context()
    urls = ["ipc://%s/align" % tempfile.mkdtemp(prefix="zc-"), "tcp://127.0.0.1:*",
            "inproc://align"]
    print("%-8s %10s %8s %10s %12s" % ("transport", "bytes", "mod 64", "mod 4096", "sent mod 64"))
    for url in urls:
        pull = ctx.socket(zmq.PULL)
        pull.bind(url)
        push = ctx.socket(zmq.PUSH)
        push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        for size in SIZES:
            sent = np.ones(size, np.uint8)
            push.send(sent, copy=False)
            assert pull.poll(10_000)
            frame = pull.recv(copy=False)
            at = np.frombuffer(frame.buffer, np.uint8).ctypes.data
            print("%-8s %10d %8d %10d %12d" % (url.split(":")[0], size, at % 64, at % 4096,
                                              sent.ctypes.data % 64))
        push.close(0)
        pull.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
