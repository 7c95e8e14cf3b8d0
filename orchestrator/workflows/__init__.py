"""Thin drivers: preflight, then train, tune, retrain or compare, each a sequence of calls into the other
packages, with the console that shows their progress."""
