"""Evaluation: sampling into the samples store, torch-fidelity metrics, peer rows, tables and store
summaries."""
