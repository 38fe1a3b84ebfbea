"""Simulator adapters for closed-loop evaluation and demonstration data (Meta-World).

Only dataset makers and evaluation scripts import this package; the library core (models, data,
training, serving) never does, so a training install needs no simulator (extra `sim`).
"""
