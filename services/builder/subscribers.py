"""Events the builder reacts to: none. Environments, conversions and images are made through its
gRPC API; it is the source of environment.registered, model.converted, image.built and image.failed."""
