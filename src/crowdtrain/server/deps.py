"""Shared route dependencies, as Annotated aliases."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Request

from crowdtrain.protocol import NODE_ID_HEADER
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.runtime import ServerRuntime
from crowdtrain.settings import NODE_NAME_CHARS, NODE_NAME_MAX

NODE_ID_PATTERN = re.compile(rf"[{NODE_NAME_CHARS}]{{1,{NODE_NAME_MAX}}}")


def _runtime(request: Request) -> ServerRuntime:
    return request.app.state.runtime


def _node_id(x_crowdtrain_node: Annotated[str | None, Header()] = None) -> str:
    # Until node authentication lands (issue 5) a node names itself in this header.
    node_id = (x_crowdtrain_node or "anonymous").strip()
    if not NODE_ID_PATTERN.fullmatch(node_id):
        raise WireError(
            400,
            "bad_node_id",
            f"{NODE_ID_HEADER} must be 1-64 characters of letters, digits, '.', '_' or '-'",
        )
    return node_id


Runtime = Annotated[ServerRuntime, Depends(_runtime)]
NodeId = Annotated[str, Depends(_node_id)]
