"""The self-contained demo: generated data and small models, nothing to download."""
