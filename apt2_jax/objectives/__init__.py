"""Training objectives: rectified flow (`flow`), consistency distillation (`consistency`)."""
