"""Events the collector reacts to: none. It consumes the capture stream MLMESH_CAPTURE (see
services.collector.consumer), not lifecycle events, and publishes none."""
