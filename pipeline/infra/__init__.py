"""Infrastructure: atomic artifact storage, content hashes, checkpoints, devices, ranks, figures, the CPU
kind, malloc's settings."""
