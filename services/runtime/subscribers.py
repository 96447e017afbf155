"""The runtime reacts to no events: the deployer tells it what to serve when it starts it."""
