"""Artifacts: adapter merge, manifests, atomic output directories."""
