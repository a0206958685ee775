"""`autopar inspect`: per-layer-type table of a model (filled by the graph-capture work)."""
