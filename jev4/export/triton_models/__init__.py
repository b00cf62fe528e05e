"""Python-backend model code that ``jev4 triton-repo`` copies into a Triton model repository (package data, not imported by jev4)."""
