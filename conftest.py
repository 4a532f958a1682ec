"""Collection rules for the whole checkout (``--doctest-modules`` imports every module of ``wva_jax``)."""
import importlib.util

# wva_jax.tunix is the optional tunix integration: it imports tunix (the llm extra); skip it where tunix is absent.
collect_ignore = [] if importlib.util.find_spec("tunix") else ["wva_jax/tunix.py"]
