"""Subcommands of ``retrieval-heads``, one module each; each defines ``register(commands)``, which adds its
parser (argparse) and the function that runs it."""
