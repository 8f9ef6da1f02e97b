"""Compression of what travels: value codecs, top-k sparsification with error feedback."""

from crowdtrain.compression.codecs import VALUE_CODECS, ValueCodec, get_value_codec
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.compression.topk import TopKCompressor, select_topk

__all__ = [
    "VALUE_CODECS",
    "SparseDelta",
    "TopKCompressor",
    "ValueCodec",
    "get_value_codec",
    "select_topk",
]
