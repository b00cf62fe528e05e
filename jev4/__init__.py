"""jev4: deployable artifacts of jina-embeddings-v4, with proof of their quality.

The package is organised as the data flows: ``model`` (checkpoint, adapters,
reference encoder) -> ``export`` / ``quant`` -> ``runtime`` -> ``validate``.
"""

__version__ = "0.1.0"
