"""Dataclasses to and from plain dicts (JSON, checkpoints), strictly: an unknown key is an
error that names the known ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """`cls(**d)`, refusing a non-dict and keys that are not fields of `cls`."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(str(key) for key in d if key not in known)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    return cls(**d)
