"""Live configuration: a versioned document of limits, policy, detector
parameters and shadow flags, published to a compacted Kafka topic, applied by
every worker between batches and acknowledged in Redis.

``document`` holds the pure models, ``service`` the publisher used by the CLI
and the admin API, ``follower`` the worker's side.
"""

from gateway.liveconfig.document import (
    ConfigConflict,
    ConfigRecord,
    FieldChange,
    LiveConfig,
    UnknownVersion,
)

__all__ = [
    "ConfigConflict",
    "ConfigRecord",
    "FieldChange",
    "LiveConfig",
    "UnknownVersion",
]
