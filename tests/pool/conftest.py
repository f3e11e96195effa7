"""Fixtures shared by the pool tests: a two-worker LocalCluster per test
module, and a fresh ClusterPool on it per test."""

import pytest

import zmq_cluster as zc


@pytest.fixture(scope="module")
def cluster():
    with zc.LocalCluster(2, heartbeat_timeout=5.0) as c:
        yield c


@pytest.fixture
def pool(cluster):
    with zc.ClusterPool(cluster) as p:
        yield p
