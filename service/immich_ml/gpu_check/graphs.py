"""Two tiny ONNX graphs for the provider and throughput probes, embedded so production needs no `onnx`.

They are regenerated and compared byte for byte with `onnx.helper` in tests/test_gpu_check.py
(`test_embedded_probe_graphs_match_onnx_helper`):
- ADD: `y = x + x`, x float[batch, 8] (opset 17, IR 8);
- CONV: image float[batch, 3, 224, 224] -> Conv(w1, stride 2) -> Relu -> Conv(w2, stride 2) -> Relu ->
  GlobalAveragePool -> features float[batch, 64, 1, 1]; the weights w1 [32, 3, 3, 3] and w2 [64, 32, 3, 3]
  are inputs, so the graph stays a few hundred bytes.
"""

from __future__ import annotations

import base64

__all__ = ["ADD", "CONV"]

ADD = base64.b64decode(
    "CAgSEGltbWljaC1ncHUtY2hlY2s6UwoOCgF4CgF4EgF5IgNBZGQSDWdwdV9jaGVja19hZGRaGAoBeBITChEIARINCgcSBWJhdGNo"
    "CgIICGIYCgF5EhMKEQgBEg0KBxIFYmF0Y2gKAggIQgQKABAR"
)

CONV = base64.b64decode(
    "CAgSEGltbWljaC1ncHUtY2hlY2s61QIKOgoFaW1hZ2UKAncxEgJjMSIEQ29udioRCgRwYWRzQAFAAUABQAGgAQcqEAoHc3RyaWRl"
    "c0ACQAKgAQcKDgoCYzESAnIxIgRSZWx1CjcKAnIxCgJ3MhICYzIiBENvbnYqEQoEcGFkc0ABQAFAAUABoAEHKhAKB3N0cmlkZXNA"
    "AkACoAEHCg4KAmMyEgJyMiIEUmVsdQohCgJyMhIIZmVhdHVyZXMiEUdsb2JhbEF2ZXJhZ2VQb29sEg5ncHVfY2hlY2tfY29udlom"
    "CgVpbWFnZRIdChsIARIXCgcSBWJhdGNoCgIIAwoDCOABCgMI4AFaHAoCdzESFgoUCAESEAoCCCAKAggDCgIIAwoCCANaHAoCdzIS"
    "FgoUCAESEAoCCEAKAgggCgIIAwoCCANiJwoIZmVhdHVyZXMSGwoZCAESFQoHEgViYXRjaAoCCEAKAggBCgIIAUIECgAQEQ=="
)
