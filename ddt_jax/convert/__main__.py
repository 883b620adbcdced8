"""`python -m ddt_jax.convert ...`: the command line of `ddt_jax.convert.cli`."""
from ddt_jax.convert import cli

cli.main()
