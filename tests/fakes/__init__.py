"""Fakes at the hardware/OS boundary for `immich-gpu-check`: an NVML stand-in and a fake host (root, PATH)."""
