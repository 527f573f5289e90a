"""Checkpoint retention for MLflow: keep the best, the recent and the protected; reclaim the rest."""
