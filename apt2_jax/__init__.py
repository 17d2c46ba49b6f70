"""apt2-jax: Autoregressive Adversarial Post-Training (AAPT) for real-time video generation."""

__version__ = "0.1.0"
