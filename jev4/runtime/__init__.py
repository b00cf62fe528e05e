"""One encoder interface over every engine: ``jev4.runtime.load(path, backend=...)``.

``encode_text`` / ``encode_image`` behave identically whatever runs them;
backends differ only in how one padded batch becomes vectors.
"""

from jev4.model.encoder import Encoder
from jev4.runtime.loader import ArtifactInfo, inspect, load

__all__ = ["ArtifactInfo", "Encoder", "inspect", "load"]
