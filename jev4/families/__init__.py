"""Model families, one room each.

A room holds everything one model family needs: its config reader, its
checkpoint layout map, its network, its preprocessing, its reference encoder
and its tiny-checkpoint writer. Code downstream (export, quant, runtime,
validate) will ask the family instead of branching on ``model_type``.
jina-clip-v2 is the first room; jina-embeddings-v4 (``jev4.model``) moves in
later, without changing its outputs.
"""
