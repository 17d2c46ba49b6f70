"""Command-line tools: latent pre-encoding, caption embedding, VAE benchmarks and references."""
