"""Cost models: compute, communication, memory and pipeline schedule."""
