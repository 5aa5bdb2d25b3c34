"""Pure tensors, never a file or a flag: denoisers, samplers, guidance, particles, attention, blurs,
views, synchronization, blurring diffusion, metrics."""
