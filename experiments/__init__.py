"""Experiment configs (ml_collections): one file per stage, sizes as the config argument."""
