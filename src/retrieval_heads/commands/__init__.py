"""Subcommands of ``retrieval-heads``; each module defines ``register(app)``."""
