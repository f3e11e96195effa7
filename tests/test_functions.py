"""FunctionCache: how a worker gets a task's function from its blob."""

import pytest

from zmq_cluster.functions import FunctionCache, FunctionUnavailable, describe, function_key


def test_a_blob_by_reference_loads_the_very_function():
    cache = FunctionCache()
    blob = describe(abs)
    assert blob == ("builtins", "abs", None)
    key = function_key(blob)
    cache.add(key, blob)
    assert key in cache and len(cache) == 1
    assert cache.get(key, trusted=False) is abs


@pytest.mark.parametrize("blob", [("builtins", None, None), (None, "abs", None), (None, None, None)])
def test_a_blob_that_does_not_name_module_and_qualname_is_unavailable(blob):
    # A blob names both or neither (functions.describe); a forged one that
    # names one of them, with no pickle to fall back on, is refused, not run.
    cache = FunctionCache()
    cache.add(1, blob)
    with pytest.raises(FunctionUnavailable, match="cannot import"):
        cache.get(1, trusted=True)


def test_an_unknown_key_is_unavailable():
    with pytest.raises(FunctionUnavailable, match="never sent"):
        FunctionCache().get(7, trusted=True)
