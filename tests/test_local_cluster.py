"""LocalCluster's lifecycle as a user meets it: arguments checked before
anything starts, and nothing left behind when it stops."""

import pytest

import zmq_cluster as zc

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"n_workers": 2.5}, TypeError, "n_workers must be an integer"),
    ({"n_workers": "2"}, TypeError, "n_workers must be an integer"),
    ({"n_workers": True}, TypeError, "n_workers must be an integer"),
    ({"heartbeat_timeout": 0}, ValueError, "heartbeat_timeout must be a finite number"),
    ({"heartbeat_timeout": -1}, ValueError, "heartbeat_timeout must be a finite number"),
    ({"heartbeat_timeout": float("nan")}, ValueError, "heartbeat_timeout must be"),
    ({"heartbeat_timeout": "10"}, TypeError, "heartbeat_timeout must be a number"),
    ({"start_timeout": 0}, ValueError, "start_timeout must be a finite number"),
    ({"log_level": "LOUD"}, ValueError, "log_level must be one of DEBUG, INFO"),
    ({"log_level": "info"}, ValueError, "log_level must be one of"),
])
def test_bad_arguments_raise_before_anything_starts(kwargs, error, message):
    # Before: a heartbeat_timeout <= 0 or a 2.5 was taken as it came, and a
    # start_timeout of 0 or an unknown log level failed in the scheduler
    # process, with its traceback on stderr.
    with pytest.raises(error, match=message):
        zc.LocalCluster(**{"n_workers": 1, **kwargs})
