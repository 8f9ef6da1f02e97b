"""Container compression for bulk bodies (zstd or identity), with bounded decompression."""

from __future__ import annotations

import io

import zstandard

from crowdtrain.protocol.errors import WireError

SUPPORTED_ENCODINGS = ("zstd", "identity")
_CHUNK = 1 << 20


def compress(data: bytes, encoding: str, level: int = 1) -> bytes:
    """Level 1: weights and gradients are near-random floats; higher levels save ~0.1% here
    and cost 60% more time (3.5 MB of fp32 deltas: 4.5 ms vs 7.2 ms)."""
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    if encoding == "identity":
        return data
    raise ValueError(f"unsupported content encoding {encoding!r}")


def decompress(data: bytes, encoding: str | None, max_output: int) -> bytes:
    """Decompress at most `max_output` bytes; a bigger output (a bomb) is a 413, not a crash."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        if len(data) > max_output:
            raise WireError(413, "too_large", f"body is {len(data)} bytes; the cap is {max_output}")
        return data
    if encoding != "zstd":
        raise WireError(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_ENCODINGS)}",
        )
    out = io.BytesIO()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        while chunk := reader.read(_CHUNK):
            out.write(chunk)
            if out.tell() > max_output:
                raise WireError(
                    413,
                    "too_large",
                    f"body decompresses to more than {max_output} bytes (the cap)",
                )
    except zstandard.ZstdError as exc:
        raise WireError(400, "bad_compression", f"body is not valid zstd: {exc}") from None
    return out.getvalue()


def accepts(accept_encoding: str | None, encoding: str) -> bool:
    """True when an Accept-Encoding header admits `encoding` (q=0 excludes it)."""
    for item in (accept_encoding or "").split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if name.lower() == encoding and _quality(params) > 0:
            return True
    return False


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0
