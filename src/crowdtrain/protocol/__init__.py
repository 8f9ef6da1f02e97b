"""Everything that parses or writes wire bytes: updates, published deltas, snapshots, schemas."""

from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.manifest import Manifest, ParamSpec

__all__ = ["Manifest", "ParamSpec", "WireError"]
