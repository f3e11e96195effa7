"""``python -m zmq_cluster.cli``: the ``zmq-cluster`` command line."""

import sys

from .main import main

sys.exit(main())
