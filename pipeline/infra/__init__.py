"""Infrastructure: atomic artifact storage, content hashes, checkpoints, devices, ranks, figures."""
