"""The checks behind `immich-gpu-check`: one module per layer (NVML, systemd, onnxruntime, HTTP API)."""
