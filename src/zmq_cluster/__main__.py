"""``python -m zmq_cluster``: the ``zmq-cluster`` command line."""

import sys

from .cli.main import main

sys.exit(main())
