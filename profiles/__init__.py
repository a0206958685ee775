"""Model intake, graph capture, hardware and cluster profiles, and the profiler."""
