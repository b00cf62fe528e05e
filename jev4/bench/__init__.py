"""Benchmarks (``jev4 bench ...``): speed and memory measured on full-size random-weight models.

They are not tests: they print and save figures, which go into docs/.
"""
