"""The decoder fuzz (tests/codec_fuzzer.py), and hypothesis on dtypes.

``ZMQ_CLUSTER_FUZZ_N`` sets how many fuzzed messages each twin decodes
(default 8000: about two seconds per twin); ``ZMQ_CLUSTER_FUZZ_SEED`` the seed.
A long run::

    ZMQ_CLUSTER_FUZZ_N=20000 python -m pytest tests/test_codec_fuzz.py -k memory_capped
"""

import json
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec_fuzzer
from conftest import TWINS
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import HEADER, KIND_REQUEST, MAGIC, VERSION

FUZZ_N = int(os.environ.get("ZMQ_CLUSTER_FUZZ_N", "8000"))
FUZZ_SEED = int(os.environ.get("ZMQ_CLUSTER_FUZZ_SEED", "6"))
HERE = os.path.dirname(os.path.abspath(__file__))

DTYPE_FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.timeout(1800)
def test_fuzzed_messages_in_a_memory_capped_process(tmp_path):
    """Every fuzzed message decodes or raises MessageFormatError, in every
    twin, the twins agreeing; in a process whose address space is capped at
    what it uses plus 512 MiB, so that an allocation sized by a declared
    length instead of by what arrived fails there; no signal kills it."""
    report_path, progress_path = tmp_path / "report.json", tmp_path / "progress"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "codec_fuzzer.py"), "--n", str(FUZZ_N),
         "--seed", str(FUZZ_SEED), "--report", str(report_path),
         "--progress", str(progress_path)],
        capture_output=True, text=True, timeout=1800)
    if proc.returncode < 0:
        last = progress_path.read_text().split()[-1:]
        pytest.fail("the fuzzer died of %s at message %s (seed %d)"
                    % (signal.Signals(-proc.returncode).name, last, FUZZ_SEED))
    assert report_path.exists(), proc.stderr
    report = json.loads(report_path.read_text())
    assert report["failures"] == [], json.dumps(report["failures"][:3], indent=1)
    assert proc.returncode == 0, proc.stderr
    assert report["ok"] + report["rejected"] == FUZZ_N
    # The mutations reach both outcomes, and many kinds of rejection.
    assert report["ok"] > FUZZ_N // 20 and report["rejected"] > FUZZ_N // 2
    assert len(report["reasons"]) > 30
    assert report["address_space_limit"]


def test_the_fuzzer_flags_what_it_must():
    """A decoder that holds more than arrived, raises another error, or
    disagrees with its twin is reported."""
    class Lavish:
        @staticmethod
        def decode(frames, allow_pickle=True):
            return 1, 0, [np.zeros(1 << 16)]

    class Broken:
        @staticmethod
        def decode(frames, allow_pickle=True):
            raise IndexError("oops")

    class Contrary:
        @staticmethod
        def decode(frames, allow_pickle=True):
            raise MessageFormatError("no")

    py = TWINS[0].values[0]
    for twins, who in (([("lavish", Lavish)], "lavish"), ([("broken", Broken)], "broken"),
                       ([("py", py), ("contrary", Contrary)], "twins disagree")):
        report = codec_fuzzer.run(20, 1, twins)
        assert any(f["who"] == who for f in report["failures"]), who


# ------------------------------------------------------------------ hypothesis

def _inline(dtype_value, itemsize_guess=8):
    body = b"A" + dtype_value + struct.pack("<BQ", 1, 1) + b"C" + bytes(itemsize_guess)
    return [HEADER.pack(MAGIC, VERSION, KIND_REQUEST, 0, 1) + body]


def _outcomes(frames):
    results = []
    for param in TWINS:
        twin = param.values[0]
        try:
            results.append(("ok", twin.decode(frames)[2]))
        except MessageFormatError as exc:
            results.append(("rejected", str(exc)))
    return results


def _agree(results):
    first = results[0]
    for other in results[1:]:
        assert other[0] == first[0], results
        if first[0] == "ok":
            assert codec_fuzzer.same(other[1], first[1]), results
        else:
            assert other[1] == first[1], results


_TYPESTRS = st.text(alphabet=codec_fuzzer._TYPESTR_ALPHABET, max_size=14) | st.sampled_from(
    codec_fuzzer.EVIL_TYPESTRS)


@DTYPE_FUZZ
@given(typestr=_TYPESTRS, size=st.sampled_from([0, 1, 2, 4, 8, 16, 32]))
def test_hypothesis_type_strings(typestr, size):
    """Never a crash, never another exception; a type string decodes only
    when numpy's reading of it is the grammar's."""
    results = _outcomes(_inline(codec_fuzzer._value(typestr), size))
    _agree(results)
    if results[0][0] == "ok":
        assert np.dtype(typestr).itemsize == size and typestr[0] in "<>|"


_NAMES = st.sampled_from(["a", "b", "", "é", ("t", "a")]) | st.text(max_size=3)
_DESCRS = st.recursive(
    _TYPESTRS,
    lambda inner: st.lists(
        st.tuples(_NAMES, inner) | st.tuples(
            _NAMES, inner, st.tuples(*[st.integers(-1, 3)] * 2) | st.just((2**31,))),
        max_size=3),
    max_leaves=8)


@DTYPE_FUZZ
@given(descr=_DESCRS.filter(lambda d: isinstance(d, list)), size=st.sampled_from([0, 8, 16]))
def test_hypothesis_descr_lists(descr, size):
    _agree(_outcomes(_inline(codec_fuzzer._value(descr), size)))
