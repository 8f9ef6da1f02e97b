"""Everything that parses or writes wire bytes: updates, published deltas, snapshots, schemas."""

from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.manifest import Manifest, ParamSpec

# who sends a request, until node authentication (issue 5) takes it from a token
NODE_ID_HEADER = "X-Crowdtrain-Node"

__all__ = ["NODE_ID_HEADER", "Manifest", "ParamSpec", "WireError"]
