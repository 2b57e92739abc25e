"""Running ONNX graphs: sessions and providers, dynamic batching, the thread pool for blocking work."""
