"""Validation: parity and retrieval quality of an artifact against the reference, with a verdict and reports."""
