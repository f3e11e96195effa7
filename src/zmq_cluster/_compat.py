"""Reads ``ZMQ_CLUSTER_NO_EXTENSIONS`` once, at import.

With it set to a non-empty value other than ``0``, every selector module
(``framing``...) uses its pure-Python twin. Without it the compiled modules
are required: a missing or broken extension raises ImportError rather than
slowing down silently.
"""

import os

NO_EXTENSIONS = os.environ.get("ZMQ_CLUSTER_NO_EXTENSIONS", "") not in ("", "0")
