"""The `rejections` fixture of the fuzz tests: counts, by logger, the
warnings that reject a malformed message. (Not a conftest.py: tests import
the top-level conftest by that name.)"""

import collections
import logging

import pytest


class Counting(logging.Handler):
    """Counts the warnings that reject a malformed message, by logger."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts = collections.Counter()

    def emit(self, record):
        if "rejected a malformed message" in record.getMessage():
            self.counts[record.name] += 1


@pytest.fixture
def rejections():
    handler = Counting()
    logger = logging.getLogger("zmq_cluster")
    logger.addHandler(handler)
    yield handler.counts
    logger.removeHandler(handler)
