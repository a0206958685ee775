"""Search over hybrid parallel strategies; the ``Plan`` type."""
