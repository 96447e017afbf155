"""Events the profiler reacts to: none. Profiles run when asked through its gRPC API; it is the
source of the profile.* events."""
