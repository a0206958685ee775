"""Shared types every layer may import: ``Strategy``, ``Plan``, ``ModelSpec``, ``ClusterSpec``,
``GpuProfile``. Nothing here imports another autopar package except ``errors`` and ``fileio``."""
