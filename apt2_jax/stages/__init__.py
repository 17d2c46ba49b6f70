"""Training stages: one trainer per stage family."""
