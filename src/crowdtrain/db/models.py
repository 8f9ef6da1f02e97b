"""Tables: datasets and their splits, imported sources, tokenized shards, leases and the epoch
ledger, the Evaluator's history, and the accounts (tokens, enrolled nodes, the audit log).

A document's content hash lives in `document_hashes` so an import can drop exact duplicates
across every split of a dataset (a validation document never also lands in train)."""

from __future__ import annotations

import time

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Times are Unix seconds (float): SQLite keeps no time zones. Sizes and counts that can pass
# 2**31 (bytes, characters, tokens, documents) are BigInteger, for PostgreSQL's sake.
# A change to any table needs a migration in db/migrations/versions (docs/data.md says how).


class Base(DeclarativeBase):
    # named constraints, so that later migrations can alter them (SQLite batch mode)
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    splits: Mapped[list[Split]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", order_by="Split.name"
    )


class Split(Base):
    __tablename__ = "splits"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(16))
    documents: Mapped[int] = mapped_column(BigInteger, default=0)
    chars: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # UTF-8 bytes of the documents
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)  # dropped by content hash
    # bumped by every import that adds documents: tokenizations of older revisions are stale
    revision: Mapped[int] = mapped_column(Integer, default=0)
    dataset: Mapped[Dataset] = relationship(back_populates="splits")
    sources: Mapped[list[Source]] = relationship(
        back_populates="split", cascade="all, delete-orphan", order_by="Source.id"
    )
    tokenizations: Mapped[list[Tokenization]] = relationship(
        back_populates="split", cascade="all, delete-orphan", order_by="Tokenization.id"
    )


class Source(Base):
    """One imported file (or directory of a Hugging Face dataset) and the part file that holds
    the documents it added."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("split_id", "sha256"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(4096))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    documents: Mapped[int] = mapped_column(BigInteger)
    duplicates: Mapped[int] = mapped_column(BigInteger)
    part: Mapped[str] = mapped_column(String(128))  # file name under the split's parts/
    imported_at: Mapped[float] = mapped_column(Float, default=time.time)
    split: Mapped[Split] = relationship(back_populates="sources")


class DocumentHash(Base):
    __tablename__ = "document_hashes"
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    hash: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id", ondelete="CASCADE"))


class Tokenization(Base):
    """A split cut into token shards by one tokenizer at one shard size and split revision."""

    __tablename__ = "tokenizations"
    __table_args__ = (
        UniqueConstraint("split_id", "tokenizer_version", "shard_tokens", "revision"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id", ondelete="CASCADE"))
    tokenizer_version: Mapped[str] = mapped_column(String(64))
    shard_tokens: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    documents: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(8))
    masked: Mapped[bool] = mapped_column(default=False)  # annotated: a loss mask per token
    directory: Mapped[str] = mapped_column(String(256))  # relative to the data directory
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    split: Mapped[Split] = relationship(back_populates="tokenizations")
    shards: Mapped[list[Shard]] = relationship(
        back_populates="tokenization", cascade="all, delete-orphan", order_by="Shard.index"
    )


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("tokenization_id", "index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tokenization_id: Mapped[int] = mapped_column(ForeignKey("tokenizations.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # of the token bytes, then the mask bytes
    file: Mapped[str] = mapped_column(String(128))
    tokenization: Mapped[Tokenization] = relationship(back_populates="shards")


class Epoch(Base):
    __tablename__ = "epochs"
    __table_args__ = (UniqueConstraint("tokenization_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tokenization_id: Mapped[int] = mapped_column(ForeignKey("tokenizations.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float, default=time.time)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Lease(Base):
    """A shard lent to a node for one epoch. States: active (the node trains on it), submitted
    (its completing update was accepted and waits for its round), completed, expired (the node
    went quiet), returned (given back, or lost in a restart)."""

    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    epoch_id: Mapped[int] = mapped_column(ForeignKey("epochs.id", ondelete="CASCADE"), index=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"))
    node: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    issued_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float] = mapped_column(Float)
    update_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Completion(Base):
    """The ledger: a shard completed in an epoch. The unique constraint is the proof that no
    shard is counted twice; coverage is these rows against the tokenization's shards."""

    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("epoch_id", "shard_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    epoch_id: Mapped[int] = mapped_column(ForeignKey("epochs.id", ondelete="CASCADE"), index=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"))
    lease_id: Mapped[str] = mapped_column(ForeignKey("leases.id", ondelete="CASCADE"))
    node: Mapped[str] = mapped_column(String(64))
    update_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)  # the model version that applied it
    completed_at: Mapped[float] = mapped_column(Float, default=time.time)


class Evaluation(Base):
    """The Evaluator's score of one model version on the server's own validation sample."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, index=True)
    time: Mapped[float] = mapped_column(Float)
    valid_loss: Mapped[float] = mapped_column(Float)
    valid_perplexity: Mapped[float] = mapped_column(Float)
    eval_s: Mapped[float] = mapped_column(Float)
    dataset: Mapped[str] = mapped_column(String(64))
    sample_tokens: Mapped[int] = mapped_column(BigInteger)


class AccessToken(Base):
    """A bearer secret, stored only as its sha256. Kinds: `api` (an admin or viewer uses it on
    every request) and `enroll` (a node trades it once per registration for an identity)."""

    __tablename__ = "access_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(24))  # the first characters, to recognise it
    kind: Mapped[str] = mapped_column(String(8))
    role: Mapped[str] = mapped_column(String(8))
    label: Mapped[str] = mapped_column(String(200), default="")
    uses: Mapped[int] = mapped_column(Integer, default=0)
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: no limit
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    created_by: Mapped[str] = mapped_column(String(80))
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class NodeAccount(Base):
    """A node's identity, made at registration. Its refresh token (hash only) buys short-lived
    access tokens; `last_seq` is the highest submission sequence number it has used."""

    __tablename__ = "node_accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the node id
    name: Mapped[str] = mapped_column(String(64))  # what the node asked to be called
    token_id: Mapped[int | None] = mapped_column(
        ForeignKey("access_tokens.id", ondelete="SET NULL"), nullable=True
    )
    refresh_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    last_seen_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AuditEvent(Base):
    """Who did what: admin actions, token use, registrations, revocations, refusals."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    actor: Mapped[str] = mapped_column(String(100))  # admin:3, node:NAME, anonymous
    action: Mapped[str] = mapped_column(String(40), index=True)
    target: Mapped[str] = mapped_column(String(100), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    address: Mapped[str] = mapped_column(String(64), default="")  # the client's IP address
