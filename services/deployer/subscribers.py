"""Events the deployer reacts to: none. Deployments change through its gRPC API; it is the
source of the deployment.* events."""
