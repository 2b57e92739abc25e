"""What the container image runs besides the daemon: PID 1 (`immich-ml-init`) and its HEALTHCHECK."""
