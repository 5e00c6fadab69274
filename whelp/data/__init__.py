"""Data: text sources (``sources``), token stores tokenized once (``tokenstore``, by ``encode``), and fixed-length
blocks over stores and weighted mixtures of them (``blocks``), which every stage reads; the teacher's own text
(``generate``) and conversations with loss masks (``chat``, ``chatgen``)."""

from whelp.data.blocks import (
    Blocks,
    TensorBlocks,
    available_tokens,
    check_data,
    data_identity,
    open_blocks,
    stream_tokens,
)
from whelp.data.sources import (
    PYDOC_SPLITS,
    check_source,
    iter_documents,
    pack,
    pydoc_split,
    read_documents,
    source_identity,
    token_stream,
)
from whelp.specs import Mixture, Source

__all__ = [
    "Blocks",
    "PYDOC_SPLITS",
    "TensorBlocks",
    "available_tokens",
    "check_data",
    "data_identity",
    "check_source",
    "iter_documents",
    "open_blocks",
    "pack",
    "Mixture",
    "Source",
    "pydoc_split",
    "read_documents",
    "source_identity",
    "stream_tokens",
    "token_stream",
]
