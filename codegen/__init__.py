"""Code generation: sharded PyTorch programs and launch scripts from a ``Plan``."""
