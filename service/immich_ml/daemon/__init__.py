"""The running daemon: listening, systemd notification, lifecycle and worker processes."""
