"""The scheduler protocol's frames: control frames, bodies, batch tables."""

import numpy as np
import pytest

from zmq_cluster import framing, schedproto as sp
from zmq_cluster.protocol import KIND_COMMAND, KIND_REQUEST
from zmq_cluster.taskcodec import encode_task


def test_ctl_round_trip_and_rejections():
    assert sp.parse_ctl(sp.ctl(sp.TASKS, 3, 1)) == (sp.TASKS, 3, 1)
    with pytest.raises(sp.ProtocolError, match="bytes"):
        sp.parse_ctl(b"ZS\x01")
    with pytest.raises(sp.ProtocolError, match="magic"):
        sp.parse_ctl(b"XX" + sp.ctl(sp.TASKS)[2:])
    with pytest.raises(sp.ProtocolError, match="version"):
        sp.parse_ctl(sp.CTL.pack(b"ZS", 9, sp.TASKS, 0, 0))
    with pytest.raises(sp.ProtocolError, match="unknown message type"):
        sp.parse_ctl(sp.CTL.pack(b"ZS", 1, 99, 0, 0))


def test_bodies_are_native_only():
    assert sp.parse_body(sp.body({"role": "worker", "credit": 4})) == {"role": "worker",
                                                                       "credit": 4}
    with pytest.raises(TypeError):
        sp.body(np.zeros(10000))  # would need a buffer frame
    with pytest.raises(TypeError):
        sp.body({1, 2})  # a set would need pickle: bodies never carry it
    pickled = bytearray(framing.encode({1, 2}, KIND_REQUEST)[0])
    pickled[3] = KIND_COMMAND  # the same body, claiming to be a control body
    with pytest.raises(sp.ProtocolError):
        sp.parse_body(bytes(pickled))
    with pytest.raises(sp.ProtocolError, match="kind"):
        sp.parse_body(framing.encode(1, KIND_REQUEST)[0])
    with pytest.raises(sp.ProtocolError):
        sp.parse_body(b"garbage")


def _batch(payloads):
    entries, frames = [], []
    for i, p in enumerate(payloads, 1):
        entry, data = sp.pack_entry(sp.TASK_ENTRY, (i, 99, 0), encode_task(sp.MODE_MAP, [p], i))
        entries.append(entry)
        frames.extend(data)
    return b"".join(entries), frames


def test_table_splits_into_entries_with_their_frames():
    big = np.arange(1 << 14, dtype=np.float64)  # 128 KiB: a buffer frame
    table, frames = _batch([1, big, "x"])
    assert len(frames) == 1  # small headers inline, one array frame
    entries = sp.walk(table, 3, sp.TASK_ENTRY, frames)
    assert [fields[0] for fields, _ in entries] == [1, 2, 3]
    assert [fields[4] for fields, _ in entries] == [0, 1, 0]
    fields, msg = entries[1]
    assert len(msg) == 2 and msg[1] is frames[0]  # the frame itself, not a copy
    kind, tid, (mode, items) = framing.decode(msg)
    assert tid == 2 and items[0] is not big and (items[0] == big).all()


def test_large_header_travels_as_a_frame():
    table, frames = _batch(["y" * (sp.INLINE_HEADER_MAX + 10)])
    ((fields, msg),) = sp.walk(table, 1, sp.TASK_ENTRY, frames)
    assert fields[3] == 0 and fields[4] == 1 and len(table) == sp.TASK_ENTRY.size
    assert msg == frames


@pytest.mark.parametrize("damage", ["truncate", "extra", "frames", "count"])
def test_inconsistent_tables_are_rejected(damage):
    table, frames = _batch([1, 2])
    count = 2
    if damage == "truncate":
        table = table[:-3]
    elif damage == "extra":
        table += b"\0"
    elif damage == "frames":
        frames = frames + [b"stray"]
    else:
        count = 3
    with pytest.raises(sp.ProtocolError):
        sp.walk(table, count, sp.TASK_ENTRY, frames)
