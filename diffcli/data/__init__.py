"""Datasets, moving-digit sequences, next-frame contexts, image folders, the 003 grading protocol, FID glue."""
