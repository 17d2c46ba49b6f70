"""Command-line tools: latent pre-encoding, VAE benchmarks."""
