"""Events the drift service reacts to: none. Checks run on schedule or when asked through its
gRPC API; it is the source of the drift.* events."""
