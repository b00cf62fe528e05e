"""Model families, one room each, and the registry that tells them apart.

A room holds everything one model family needs: its config reader, its
checkpoint layout map, its network, its preprocessing, its reference encoder
and its tiny-checkpoint writer. ``jev4.families.registry`` recognises a
checkpoint's family from ``config.json``'s ``model_type``
(:func:`~jev4.families.registry.family_of`) and hands out the family's
reference loader and tiny writer, so code downstream (export, quant,
runtime, validate, the CLI) asks the family instead of branching on
``model_type``. Adding a family = its room + one entry in
``registry.FAMILIES``.

jina-clip-v2 (``jev4.families.jina_clip_v2``) is the first room;
jina-embeddings-v4 still lives in ``jev4.model`` (its registry entry points
there) and moves in later, without changing its outputs.
"""
