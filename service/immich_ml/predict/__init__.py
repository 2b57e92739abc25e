"""One predict request: the entries parsed into plans, run across the models."""
