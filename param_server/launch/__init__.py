"""Code that starts every side at once: the daemon as a child process, the
demo, and federated rounds under Flower's simulation or deployment engine.
With the CLI, the only code that imports the server, the node and the
institution sides together."""
