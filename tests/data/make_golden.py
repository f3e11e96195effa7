"""(Re)write the golden wire-format messages in tests/data/golden/.

Each ``golden/NAME.frames`` file is JSON: the message's ``description``, its
``kind`` (name and code), its ``task_id``, and its ``frames``, each frame as
a hex string (the header frame first, then the buffer frames), exactly as
docs/protocol.md specifies them. The bytes are produced by the pure-Python
framing twin from the objects built in :func:`cases` below.

tests/test_protocol.py compares both framing twins against the COMMITTED
files, not against a fresh run of this script: a change to the wire bytes
shows up as a test failure and as a diff of these files in review. Run this
script only when the wire format is deliberately changed (and bump
``protocol.VERSION`` then, once a version has been released; version 1 is
not released yet, so inline arrays, tag 'A', were added to it)::

    PYTHONPATH=src ZMQ_CLUSTER_NO_EXTENSIONS=1 python tests/data/make_golden.py

Only pickle-free messages are stored: pickle bytes are not stable across
Python versions. Numpy scalars are written in the machine's byte order;
like the tests, this script assumes a little-endian machine.
"""

import json
import os
import sys

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

# Message kinds (protocol.KIND_*), spelled out so that this list of cases can
# be imported without zmq_cluster.
REQUEST, RESULT, COMMAND = 1, 2, 3
KIND_NAMES = {REQUEST: "REQUEST", RESULT: "RESULT", COMMAND: "COMMAND"}

#: Task id of the worked example in docs/protocol.md (a ventilator's id: a
#: random 32-bit prefix, then a counter starting at 1).
EXAMPLE_TASK_ID = 0x1234567800000001

#: The exception of the golden FAIL result, as a worker formats it.
FAIL_MESSAGE = "negative input: -1"
FAIL_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "worker.py", line 12, in HandleRequest\n'
    '    raise ValueError("negative input: %d" % request)\n'
    "ValueError: negative input: -1\n")


def cases():
    """The golden messages: a list of dicts with name, description, kind,
    task_id, obj (a fresh object on every call) and, where a trusted
    receiver decodes something else than obj, decoded. Needs zmq_cluster
    only for its records and exceptions."""
    from zmq_cluster.exceptions import RemoteError
    from zmq_cluster.messages import ClusterRequest, ClusterResult

    example_array = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # What a trusted receiver makes of the exceptions below.
    rebuilt = ValueError(FAIL_MESSAGE)
    rebuilt.remote_traceback = FAIL_TRACEBACK
    with_args = ValueError("bad input", 3)
    with_args.remote_traceback = ""
    return [
        dict(name="request_int",
             description="A ClusterRequest whose payload is the int 7 and whose metadata "
                         "is None.",
             kind=REQUEST, task_id=0x00000000CAFE0001,
             obj=ClusterRequest(7)),
        dict(name="request_array_metadata",
             description="The worked example of docs/protocol.md: a ClusterRequest whose "
                         "payload is a 2x3 C-order float64 array [[1,2,3],[4,5,6]] (48 bytes, "
                         "below INLINE_LIMIT: inline in the header frame, so the message is "
                         "one frame) and whose metadata is {'i': 3}.",
             kind=REQUEST, task_id=EXAMPLE_TASK_ID,
             obj=ClusterRequest(example_array, {"i": 3})),
        dict(name="result_ok_metadata",
             description="The worked example's result: a ClusterResult with status 'OK', "
                         "payload 2*[[1,2,3],[4,5,6]] (float64, C order, inline), request_metadata "
                         "{'i': 3}, worker metadata {'host': 'node1', 'pid': 4242, "
                         "'seconds': 0.25} and exception None; task id echoed.",
             kind=RESULT, task_id=EXAMPLE_TASK_ID,
             obj=ClusterResult("OK", example_array * 2, {"i": 3},
                               {"host": "node1", "pid": 4242, "seconds": 0.25}, None)),
        dict(name="array_fortran_big_endian",
             description="A bare request payload (as BasicVentilator sends it): a 2x3 "
                         "Fortran-order big-endian int32 ('>i4') array of 0..5, inline (tag "
                         "'A'); its 24 bytes hold the elements in column-major order, each "
                         "big-endian.",
             kind=REQUEST, task_id=2,
             obj=np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3))),
        dict(name="array_structured",
             description="A bare request payload: a structured array of 2 records, dtype "
                         "[('id', '<i4'), ('x', '<f8'), ('v', '<i2', (2,))], whose dtype "
                         "travels as a .npy-style descr list; inline (tag 'A').",
             kind=REQUEST, task_id=3,
             obj=np.array([(1, 0.5, [1, -1]), (2, -2.25, [3, 4])],
                          dtype=[("id", "<i4"), ("x", "<f8"), ("v", "<i2", (2,))])),
        dict(name="nested_values",
             description="A bare request payload exercising every native non-array tag: "
                         "dict, list, tuple, str (non-ASCII), bytes, None, True, False, "
                         "int64 extremes, big ints beyond int64, float, complex, an int key.",
             kind=REQUEST, task_id=4,
             obj={"none": None, "bools": [True, False],
                  "tuple": (1, "two", b"\x00\xff"),
                  "ints": [0, -1, 2**63 - 1, -2**63],
                  "bigints": [2**63, -2**63 - 1, 2**100, -2**64],
                  "float": -0.1, "complex": complex(1.5, -2.0),
                  "str": "h\u00e9llo \u20ac", "empty": ["", b"", [], (), {}],
                  1: "int key"}),
        dict(name="numpy_scalars",
             description="A bare request payload: a list of numpy scalars (float32, int64, "
                         "bool_, complex128, datetime64[s], bytes_ 'S3'), each as tag 'g'.",
             kind=REQUEST, task_id=5,
             obj=[np.float32(1.5), np.int64(-2), np.bool_(True), np.complex128(1 - 1j),
                  np.datetime64("2024-01-02T03:04:05", "s"), np.bytes_(b"abc")]),
        dict(name="request_multi_array",
             description="A ClusterRequest whose payload holds three small arrays, all "
                         "inline (one frame): an int64 arange(3), a 0-d uint16 array and an "
                         "empty 0x3 float32 array (no bytes); metadata is a tuple.",
             kind=REQUEST, task_id=6,
             obj=ClusterRequest({"a": np.arange(3, dtype="<i8"),
                                 "b": [np.array(5, dtype="<u2"),
                                       np.zeros((0, 3), dtype="<f4")]},
                                ("batch", 0))),
        dict(name="request_inline_and_frame_arrays",
             description="A ClusterRequest whose payload is a list of two float64 arrays "
                         "straddling INLINE_LIMIT (4096 bytes): arange(511) (4088 bytes, "
                         "inline: tag 'A', its bytes in the header frame) and arange(512) "
                         "(4096 bytes, tag 'a': buffer frame 0); metadata is None.",
             kind=REQUEST, task_id=7,
             obj=ClusterRequest([np.arange(511, dtype="<f8"), np.arange(512, dtype="<f8")])),
        dict(name="result_fail_exception",
             description="A FAIL result as a worker sends it when its handler raised "
                         "ValueError('negative input: -1'): payload None, the request's "
                         "metadata {'i': 3}, the worker's metadata, and the exception as an "
                         "'E' value (no pickle): module 'builtins', qualname 'ValueError', "
                         "args None (a receiver builds the exception from its message), the "
                         "message, and the worker's traceback text.",
             kind=RESULT, task_id=EXAMPLE_TASK_ID,
             obj=ClusterResult("FAIL", None, {"i": 3},
                               {"host": "node1", "pid": 4242, "seconds": 0.25},
                               RemoteError("builtins.ValueError", FAIL_MESSAGE, FAIL_TRACEBACK)),
             decoded=ClusterResult("FAIL", None, {"i": 3},
                                   {"host": "node1", "pid": 4242, "seconds": 0.25}, rebuilt)),
        dict(name="exception_with_args",
             description="A bare exception value, ValueError('bad input', 3), never raised: "
                         "module 'builtins', qualname 'ValueError', args ['bad input', 3] "
                         "(native values), message \"('bad input', 3)\", traceback ''.",
             kind=RESULT, task_id=8, obj=ValueError("bad input", 3), decoded=with_args),
        dict(name="command_worker_kill",
             description="The command that stops workers: the str 'CLUSTER_WORKER_KILL' as "
                         "a COMMAND message with task id 0.",
             kind=COMMAND, task_id=0, obj="CLUSTER_WORKER_KILL"),
        dict(name="command_sink_kill",
             description="The command that stops sinks: the str 'CLUSTER_SINK_KILL' as a "
                         "COMMAND message with task id 0.",
             kind=COMMAND, task_id=0, obj="CLUSTER_SINK_KILL"),
    ]


def frame_bytes(frame):
    """The bytes of one encoded frame (bytes, or a uint8 array view)."""
    return bytes(memoryview(frame).cast("B"))


def record(case, frames):
    return {
        "name": case["name"],
        "description": case["description"],
        "generated_by": "tests/data/make_golden.py (do not edit by hand)",
        "kind": KIND_NAMES[case["kind"]],
        "kind_code": case["kind"],
        "task_id": case["task_id"],
        "frames": [frame_bytes(f).hex() for f in frames],
    }


def main():
    if sys.byteorder != "little":
        sys.exit("make_golden.py writes little-endian numpy scalars; run it on a "
                 "little-endian machine")
    from zmq_cluster import _framing_py

    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for case in cases():
        frames = _framing_py.encode(case["obj"], case["kind"], case["task_id"])
        path = os.path.join(GOLDEN_DIR, case["name"] + ".frames")
        with open(path, "w") as out:
            json.dump(record(case, frames), out, indent=2)
            out.write("\n")
        print("wrote", os.path.relpath(path))


if __name__ == "__main__":
    main()
