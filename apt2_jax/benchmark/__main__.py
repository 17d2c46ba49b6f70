"""`python -m apt2_jax.benchmark`: see `apt2_jax.benchmark.cli`."""
from apt2_jax.benchmark import cli

cli.run_main()
