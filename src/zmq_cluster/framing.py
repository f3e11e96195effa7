"""Selects the framing twin: compiled unless ZMQ_CLUSTER_NO_EXTENSIONS is set.

Both twins provide ``encode(obj, kind, task_id=0, stats=None) -> frames``
and ``decode(frames, allow_pickle=True, copy_threshold=COPY_THRESHOLD,
alignment=None, stats=None) -> (kind, task_id, obj)``, with the same
behaviour, errors and bytes; ``_framing_py`` states the contract (and gives
the types), docs/protocol.md the bytes. Both provide the batch-table
functions ``walk_table``, ``scan_table`` and ``encode_task_table``
(``_framing_tables`` states their contracts).
"""

from typing import TYPE_CHECKING

from ._compat import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._framing_py import decode, encode
    from ._framing_tables import encode_task_table, scan_table, walk_table
    FASTPATH = False
else:
    import zmq  # noqa: F401  (loads the libzmq the extension links against)

    from ._fastpath.framing import decode, encode, encode_task_table, scan_table, walk_table
    FASTPATH = True

__all__ = ["encode", "decode", "walk_table", "scan_table", "encode_task_table", "FASTPATH"]
