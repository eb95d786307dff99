"""modelgate's service: Kafka and Redis I/O, authentication, policy, the worker
and the ``modelgate`` command line. Detection itself lives in ``detectors``."""
