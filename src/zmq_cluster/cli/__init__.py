"""The ``zmq-cluster`` command line (also ``python -m zmq_cluster``).

:func:`main` parses the arguments and runs one subcommand; each subcommand
is a module of this package. See :mod:`.main`.
"""

from .main import main

__all__ = ["main"]
