"""Calibration data: the FP trajectories and layer inputs / outputs (``calib.zarr``) and their
per-channel statistics (``stats.zarr``)."""
