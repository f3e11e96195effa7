"""A seeded fuzzer of the framing decoders (run by tests/test_codec_fuzz.py).

It builds valid messages from a corpus of objects (arrays of every form,
structured dtypes, scalars, exceptions, pickles, commands...), then derives
malformed ones by seeded random mutations: truncations, byte and bit flips,
splices of two messages, huge declared sizes and counts, random bodies,
wrong frame counts, resized buffer frames, evil dtypes (type strings from a
list of known crashers and random ones, descr lists with evil fields,
subarray shapes, nesting) and random value trees. Every message goes to
every framing twin available; an outcome must be a decoded value or a
MessageFormatError, and the twins must agree (equal values, or equal
error texts).

Run as a script it decodes ``--n`` messages per twin in this process,
after capping its address space (RLIMIT_AS) at what it uses plus
``--headroom-mb``: a decoder that allocated from a declared size rather
than from what arrived fails with MemoryError, which is not an allowed
outcome. It writes a JSON report; a crash (a signal) shows as the exit
status, with the index of the message being decoded in ``--progress``.
"""

import argparse
import collections
import datetime
import decimal
import fractions
import json
import os
import random
import struct
import sys
import traceback

import numpy as np

HEADER = struct.Struct("<2sBBIQ")

#: Type strings that crashed, or could crash, a decoder that handed them to
#: numpy unchecked, and others at the edges of the grammar.
EVIL_TYPESTRS = [
    "<M8[s/0]", "<m8[s/0]", "M8[s/0]", "<M8[0s]", "<M8[1/0s]", "<M8[s/2]", "<M8[-1s]",
    "<M8[2147483648s]", "<M8[99999999999999999999s]", "<M8[generic]", "<M8[B]", "<M8[μs]",
    "|S0", "<U0", "|V0", "S", "U", "V", "S0", "|S", "|S2147483648", "<U536870912",
    "|V2147483647", "|O", "O", "<T", "=f8", "!f8", "|f8", "<f08", "<f3", "<f12", "<c24",
    "<i16", "<b1", "|b2", "|?", "?", "(2,)<f8", "<f8,<i4", "<f8 ", " <f8", "", "<",
    "<M8", "<m8[25ms]", ">M8[D]", "<U2147483647", "|S" + "9" * 50, "<f" + "0" * 4300,
]
_TYPESTR_ALPHABET = "<>|=!bBiufcmMSUVOT?0123456789[]/smhuYDWnpfa ,()'-"


def corpus():
    """(kind, task_id, obj): the seeds."""
    from zmq_cluster.exceptions import RemoteError
    from zmq_cluster.messages import ClusterRequest, ClusterResult

    try:
        raise ValueError("boom", 3)
    except ValueError as exc:
        raised = exc
    struct_dt = np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")])
    nested_dt = np.dtype([(("title", "x"), "u1"), ("y", [("z", "<i2", (2, 3)), ("w", "<M8[s]")])])
    aligned_dt = np.dtype([("x", "u1"), ("y", "<f8")], align=True)
    deep = 7
    for _ in range(240):
        deep = [deep]
    info = {"host": "h", "pid": 1, "seconds": 0.5}
    objs = [
        (1, ClusterRequest(np.arange(6.0).reshape(2, 3), {"i": 3})),
        (1, ClusterRequest(np.arange(600.0), None)),
        (1, ClusterRequest([np.arange(511.0), np.arange(512.0)], ("batch", 0))),
        (1, np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))),
        (1, np.zeros(3, struct_dt)),
        (1, np.ones(2, nested_dt)),
        (1, np.ones(600, aligned_dt)),
        (1, np.arange(5).astype("<M8[25s]")),
        (1, np.array(["ab", "ü"]),),
        (1, [np.float32(1.5), np.datetime64("2020-01-01", "s"), np.str_("ab"), np.void(b"xy"),
             np.str_(""), np.zeros(2, struct_dt)[0], np.int64(-2), np.bool_(True)]),
        (1, {"none": None, "t": (1, "two", b"\x00\xff"), "big": [2**63, -2**100],
             "f": -0.1, "c": 1.5 - 2j, "s": "héllo", 1: [True, False, [], {}, ()]}),
        (1, deep),
        (2, ClusterResult("OK", [1, "two", {"three": 3}], {"i": 1}, info, None)),
        (2, ClusterResult("FAIL", None, {"i": 1}, info, raised)),
        (2, ClusterResult("FAIL", None, None, info,
                          RemoteError("mod.Err", "went wrong", "Traceback ...\nmod.Err\n"))),
        (2, [KeyError("k"), OSError(2, "nf"), ValueError({1, 2}), ValueError(np.arange(3))]),
        (1, {1, 2, 3}),
        (1, ClusterRequest(frozenset({"a"}), collections.OrderedDict(a=1))),
        (1, [fractions.Fraction(1, 3), decimal.Decimal("1.5"), datetime.date(2020, 1, 2),
             range(5)]),
        (1, np.array([1, "x", None], dtype=object)),
        (1, np.rec.array(np.zeros(600, struct_dt))),  # pickled, an out-of-band buffer
        (3, "CLUSTER_WORKER_KILL"),
        (3, np.arange(3)),
        (3, ["kill", {"n": 1}]),
    ]
    return [(kind, 1000 + i, obj) for i, (kind, obj) in enumerate(objs)]


def seed_messages(encode):
    return [[bytes(memoryview(f).cast("B")) for f in encode(obj, kind, task_id)]
            for kind, task_id, obj in corpus()] + split_seeds()


def split_seeds():
    """Valid messages with split arrays (tag 'c'), cut small: a receiver
    accepts any frame sizes that add up, so the fuzzer need not send megabytes."""
    out = []
    for dtype, order, data, cuts in [(b"<f8", b"C", bytes(range(48)), [8, 40]),
                                     (b"<U2", b"F", "abcdef".encode("utf-32-le"), [1, 5, 23]),
                                     (b"|u1", b"C", bytes(7), [0, 7])]:
        itemsize = {b"<f8": 8, b"<U2": 8, b"|u1": 1}[dtype]
        shape = struct.pack("<BQ", 1, len(data) // itemsize)
        parts = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        body = (b"l\x02\x00\x00\x00" + b"c" + struct.pack("<II", 0, len(parts)) + _s(dtype)
                + shape + order + b"a" + struct.pack("<I", len(parts)) + _s(b"|u1")
                + struct.pack("<BQ", 1, 5) + b"C")
        out.append([HEADER.pack(b"ZC", 2, 1, len(parts) + 1, 3) + body] + parts + [bytes(5)])
    return out


# ------------------------------------------------------------------ writers

def _s(text):
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return b"s" + struct.pack("<I", len(raw)) + raw


def _value(obj):
    """A tiny writer of the tags a dtype value may hold (s, l, t, i)."""
    if isinstance(obj, (str, bytes)):
        return _s(obj)
    if isinstance(obj, int):
        return b"i" + struct.pack("<q", max(-2**63, min(obj, 2**63 - 1)))
    tag = b"l" if isinstance(obj, list) else b"t"
    return tag + struct.pack("<I", len(obj)) + b"".join(_value(item) for item in obj)


def _random_typestr(rng):
    if rng.random() < 0.5:
        return rng.choice(EVIL_TYPESTRS)
    return "".join(rng.choice(_TYPESTR_ALPHABET) for _ in range(rng.randint(0, 12)))


def _random_descr(rng, depth=0):
    fields = []
    for _ in range(rng.choice([0, 1, 2, 3, 5])):
        name = rng.choice(["a", "b", "", ("t", "a"), ("a", "a"), "a", 7, ["x"]])
        if depth < 3 and rng.random() < 0.3:
            ftype = _random_descr(rng, depth + 1)
        else:
            ftype = rng.choice(["<f8", "|u1", "|S3", "<M8[s]", "|V4"] + [_random_typestr(rng)])
        field = [name, ftype]
        if rng.random() < 0.3:
            field.append(tuple(rng.choice([0, 1, 2, 3, 2**31, 2**40, -1])
                               for _ in range(rng.choice([0, 1, 2, 65]))))
        fields.append(tuple(field) if rng.random() < 0.95 else list(field))
    if depth == 0 and rng.random() < 0.05:
        fields = fields * 2000  # the field count limit
    return fields


def _evil_array(rng, kind):
    """A message holding an array or scalar of an evil dtype."""
    dtype = _value(_random_typestr(rng) if rng.random() < 0.6 else _random_descr(rng))
    if rng.random() < 0.1:
        dtype = rng.choice([b"I" + struct.pack("<I", 1800) + b"\x7f" * 1800,
                            b"p" + struct.pack("<I", 2) + b"N." + struct.pack("<I", 0),
                            b"N", b"d" + bytes(8), _value([[[["<f8"]]]])])
    ndim = rng.choice([0, 1, 1, 2, 3, 64, 65, 255])
    shape = [rng.choice([0, 1, 2, 3, 5, 2**20, 2**26, 2**31, 2**40, 2**63, 2**64 - 1])
             for _ in range(ndim)]
    shape_bytes = struct.pack("<B%dQ" % ndim, ndim, *shape)
    data = bytes(rng.choice([0, 1, 8, 16, 24, 48, 64]))
    form = rng.choice("Aagc")
    if form == "A":
        body, frames = b"A" + dtype + shape_bytes + b"C" + data, []
    elif form == "a":
        body, frames = b"a" + struct.pack("<I", 0) + dtype + shape_bytes + b"F", [data]
    elif form == "c":
        count = rng.choice([0, 1, 2, 3, 0xFFFFFFFF])
        cut = rng.randint(0, len(data))
        frames = [data[:cut], data[cut:], b""][:min(count, 3)]
        body = b"c" + struct.pack("<II", 0, count) + dtype + shape_bytes + b"F"
    else:
        body, frames = b"g" + dtype + struct.pack("<I", len(data)) + data, []
    if rng.random() < 0.5:
        body = b"l\x01\x00\x00\x00" + body
    return [HEADER.pack(b"ZC", 2, kind, len(frames), 9) + body] + frames


def _random_tree(rng, depth=0):
    """Random bytes in the shape of values: real tags, random counts."""
    tag = rng.choice(b"NTFidjsbltmaAcgRSEpIz\x00")
    out = bytes([tag])
    if tag in b"lt":
        count = rng.choice([0, 1, 2, 3, 0xFFFFFFFF])
        out += struct.pack("<I", count)
        if depth < 6:
            out += b"".join(_random_tree(rng, depth + 1) for _ in range(min(count, 3)))
    elif tag == ord("m"):
        out += struct.pack("<I", rng.choice([0, 1, 2, 0x7FFFFFFF]))
        if depth < 6:
            out += _random_tree(rng, depth + 1) + _random_tree(rng, depth + 1)
    elif tag in b"sbIp":
        n = rng.choice([0, 1, 3, 5, 0xFFFFFFFF])
        out += struct.pack("<I", n) + bytes(rng.getrandbits(8) for _ in range(min(n, 5)))
    elif tag in b"idj":
        out += bytes(rng.getrandbits(8) for _ in range({"i": 8, "d": 8, "j": 16}[chr(tag)]))
    elif tag in b"RSE" and depth < 6:
        out += b"".join(_random_tree(rng, depth + 1) for _ in range({"R": 2, "S": 5, "E": 5}[chr(tag)]))
    return out


# ------------------------------------------------------------------ mutations

_U32_EVIL = [0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000, 1, 0]
_U64_EVIL = [2**40, 2**62, 2**63, 2**64 - 1, 2**32]


def mutate(rng, seeds):
    """One malformed (or, by luck, valid) message: ``(operation, frames)``."""
    frames = [bytearray(f) for f in rng.choice(seeds)]
    header = frames[0]
    op = rng.choice(["truncate", "flip", "flip", "splice", "huge", "random", "frames",
                     "resize", "evil_dtype", "evil_dtype", "tree", "valid"])
    if op == "truncate":
        cut = rng.randrange(len(header) + 1)
        frames[0] = header[:cut]
        if frames[1:] and rng.random() < 0.3:
            frames.pop()
    elif op == "flip":
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(header))
            if rng.random() < 0.5:
                header[at] ^= 1 << rng.randrange(8)
            else:
                header[at] = rng.randrange(256)
    elif op == "splice":
        other = rng.choice(seeds)[0]
        frames[0] = header[:rng.randrange(16, len(header) + 1)] + other[rng.randrange(
            16, len(other) + 1):]
    elif op == "huge":
        if rng.random() < 0.2:
            at = 4  # the fixed header's frame count
        else:
            at = rng.randrange(16, max(17, len(header) - 3))
        if rng.random() < 0.6:
            header[at:at + 4] = struct.pack("<I", rng.choice(_U32_EVIL))
        else:
            header[at:at + 8] = struct.pack("<Q", rng.choice(_U64_EVIL))
    elif op == "random":
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        extra = [bytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 2))]
        frames = [bytearray(HEADER.pack(b"ZC", 2, rng.choice([1, 2, 3]), len(extra),
                                        rng.getrandbits(64)) + body)] + extra
        if rng.random() < 0.1:
            frames[0] = bytearray(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 30))))
    elif op == "frames":
        choice = rng.randrange(3)
        if choice == 0:
            frames.insert(rng.randint(1, len(frames)), bytearray(rng.randint(0, 64)))
        elif choice == 1 and len(frames) > 1:
            frames.pop(rng.randrange(1, len(frames)))
        else:
            header[4:8] = struct.pack("<I", rng.choice([0, 1, 2, 3, 0xFFFFFFFF]))
    elif op == "resize" and len(frames) > 1:
        at = rng.randrange(1, len(frames))
        frames[at] = frames[at][:rng.randrange(len(frames[at]) + 1)] + bytes(rng.choice([0, 8]))
    elif op == "evil_dtype":
        frames = [bytearray(f) for f in _evil_array(rng, rng.choice([1, 2]))]
    elif op == "tree":
        body = _random_tree(rng)
        frames = [bytearray(HEADER.pack(b"ZC", 2, rng.choice([1, 2, 3]), 0, 5) + body)]
    return op, [bytes(f) for f in frames]


# ------------------------------------------------------------------ outcomes

def same(a, b):
    """Equality of two decoded values (arrays by dtype, shape, layout and
    bytes; NaN equals NaN; exceptions by type, args and str)."""
    from zmq_cluster.messages import ClusterRequest, ClusterResult

    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.flags.c_contiguous != \
                b.flags.c_contiguous or a.flags.f_contiguous != b.flags.f_contiguous:
            return False
        if a.dtype.hasobject:
            return all(same(x, y) for x, y in zip(a.flat, b.flat))
        return a.tobytes(order="A") == b.tobytes(order="A")
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a.items(), b.items()))
    if isinstance(a, BaseException):
        return same(a.args, b.args) and str(a) == str(b)
    if isinstance(a, (ClusterRequest, ClusterResult)):
        return all(same(getattr(a, f), getattr(b, f)) for f in type(a).__slots__)
    try:
        return bool(a == b) or repr(a) == repr(b)
    except Exception:
        return repr(a) == repr(b)


def array_bytes(value, seen=None):
    """The bytes of every ndarray reachable in a decoded value."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(array_bytes(item, seen) for item in value)
    if isinstance(value, dict):
        return sum(array_bytes(k, seen) + array_bytes(v, seen) for k, v in value.items())
    for field in getattr(type(value), "__slots__", ()):  # ClusterRequest, ClusterResult
        return sum(array_bytes(getattr(value, name, None), seen)
                   for name in type(value).__slots__)
    return 0


def outcome(twin, frames, allow_pickle):
    """``("ok", value)`` or ``("rejected", text)``; anything else raises,
    including a decoded value whose arrays hold more bytes than arrived."""
    from zmq_cluster.exceptions import MessageFormatError

    try:
        value = twin.decode(frames, allow_pickle=allow_pickle)
    except MessageFormatError as exc:
        if "MemoryError" in str(exc) and "does not load" not in str(exc):
            # The decoder tried to allocate what did not arrive (a pickle's
            # own allocations are the pickle's business).
            raise AssertionError("rejected only when an allocation failed: %s" % exc) from None
        return "rejected", str(exc)
    arrived = sum(len(memoryview(f).cast("B")) for f in frames)
    held = array_bytes(value)
    if held > arrived:
        raise AssertionError("decoded arrays hold %d bytes; %d arrived" % (held, arrived))
    return "ok", value


def run(n, seed, twins, progress=None):
    """Decode ``n`` fuzzed messages with every twin: a report dict."""
    from zmq_cluster import _framing_py

    rng = random.Random(seed)
    seeds = seed_messages(_framing_py.encode)
    report = {"n": n, "seed": seed, "twins": [name for name, _ in twins], "ok": 0,
              "rejected": 0, "operations": collections.Counter(), "reasons": collections.Counter(),
              "failures": []}
    for index in range(n):
        op, frames = mutate(rng, seeds)
        allow_pickle = rng.random() < 0.25
        if rng.random() < 0.5:
            import zmq
            frames = [zmq.Frame(f) for f in frames]
        if progress is not None:
            progress.write("%d\n" % index)
            progress.flush()
        report["operations"][op] += 1
        results = []
        for name, twin in twins:
            try:
                results.append(outcome(twin, frames, allow_pickle))
            except BaseException as exc:  # noqa: BLE001 -- the finding
                if isinstance(exc, KeyboardInterrupt):
                    raise
                results.append(("error", "%s: %s" % (type(exc).__name__, exc)))
                _fail(report, index, op, name, frames, traceback.format_exc())
        if len(results) == 2 and not (
                results[0][0] == results[1][0] and (
                    same(results[0][1], results[1][1]) if results[0][0] == "ok"
                    else results[0][1] == results[1][1])):
            _fail(report, index, op, "twins disagree", frames,
                  "%r\n%r" % (results[0], results[1]))
        kind = results[0][0]
        if kind in ("ok", "rejected"):
            report[kind] += 1
        if kind == "rejected":
            report["reasons"][_reason(results[0][1])] += 1
    return report


def _reason(text):
    """A rejection's text without its numbers: groups like rejections."""
    words = []
    for word in text.split():
        if any(ch.isdigit() for ch in word) or word.startswith(("'", '"', "b'", 'b"')):
            word = "#"
        if not words or words[-1] != word:
            words.append(word)
        if len(words) == 9:
            break
    return " ".join(words)


def _fail(report, index, op, who, frames, detail):
    if len(report["failures"]) < 20:
        report["failures"].append({
            "index": index, "operation": op, "who": who, "detail": detail[-2000:],
            "frames": [bytes(memoryview(f).cast("B")).hex()[:400] for f in frames]})
    else:
        report["failures_left_off"] = report.get("failures_left_off", 0) + 1


def _cap_address_space(headroom_mb):
    import resource
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (vm_kb + headroom_mb * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--headroom-mb", type=int, default=512)
    parser.add_argument("--report", required=True)
    parser.add_argument("--progress")
    args = parser.parse_args(argv)

    import zmq  # noqa: F401  (before the cap: libzmq and numpy reserve their memory)

    from zmq_cluster import _framing_py
    from zmq_cluster._compat import NO_EXTENSIONS
    twins = [("py", _framing_py)]
    if not NO_EXTENSIONS:
        from zmq_cluster._fastpath import framing
        twins.append(("cy", framing))
    seed_messages(_framing_py.encode)  # warm the caches and imports before the cap
    limit = _cap_address_space(args.headroom_mb) if os.path.exists("/proc/self/status") else None
    progress = open(args.progress, "w") if args.progress else None
    report = run(args.n, args.seed, twins, progress)
    report["address_space_limit"] = limit
    with open(args.report, "w") as out:
        json.dump(report, out, indent=1, sort_keys=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
