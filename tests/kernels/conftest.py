"""Kernel tests run the Pallas kernels in interpret mode on CPU.

With libtpu installed, every jax process loads it at backend start-up and takes
/tmp/libtpu_lockfile, so a second process (another pytest run, a training job) would fail to
build the compile-only TPU topologies of test_tpu_aot.py. Compile-only use needs no exclusive
access; this must be set before jax initialises its backends, i.e. at collection time.
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
