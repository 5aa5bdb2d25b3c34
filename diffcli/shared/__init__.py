"""The layer under everything: errors, devices, files, names, images, run records, memory, checkpoints,
limits, torchrun, caches, config files, shipped paths."""
