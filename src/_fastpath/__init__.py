"""Compiled fast paths of zmq_cluster (Cython); each has a pure-Python twin."""

# The extensions link against the libzmq that pyzmq loads (its bundled copy,
# by soname). Importing zmq first maps that library, so the dynamic loader
# reuses it by soname whatever the extension's rpath says: one libzmq per
# process, even for an editable install built in a throwaway build env.
import zmq  # noqa: F401
