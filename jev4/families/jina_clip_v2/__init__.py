"""jina-clip-v2: a jina-xlm-roberta text tower (one always-on LoRA) and an EVA02-L/14 vision tower.

Written from public sources only (the upstream modelling code is loaded with
trust_remote_code and is not reachable here); each module cites the source of
each fact it relies on. See docs/jina-clip-v2.md.
"""

from jev4.families.jina_clip_v2.config import MODEL_TYPE, ClipV2Config, load_config

__all__ = ["MODEL_TYPE", "ClipV2Config", "load_config"]
