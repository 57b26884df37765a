"""The steps of the method (arXiv 2507.12933): timestep weighting, LES, weight initialisation and
AdaRound, per-step activation calibration with PTS voting."""
