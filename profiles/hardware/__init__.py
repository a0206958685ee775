"""Hardware profiles (GPU and CPU) and cluster presets as data files."""
