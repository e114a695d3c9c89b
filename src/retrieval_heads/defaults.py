"""Defaults that the commands and the library share, importable without torch (the CLI reads them to build
its help before anything heavy is loaded).

>>> DEFAULT_MAX_NEW_TOKENS
12
"""

# Longest greedy answer, in tokens: detect --answers, retrieval_score, sweep, ablate. The built-in answers are
# a state, a year or a count (at most 5 tokens on SmolLM2's tokenizer); Wu et al.'s code decodes up to 50.
# bench/peers.py measures what 50 would change.
DEFAULT_MAX_NEW_TOKENS = 12
