"""Wan2.1 weight import and export between the diffusers layout and apt2-jax parameter trees."""
