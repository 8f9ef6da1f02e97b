"""The server's security parts in one place: accounts, the audit log, node access tokens and
the rate limits that guard logins, registrations and submissions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowdtrain.db import Database
from crowdtrain.server.accounts import Accounts
from crowdtrain.server.audit import AuditLog
from crowdtrain.server.auth import JwtKeys, SlidingWindow
from crowdtrain.settings import ServerSettings


@dataclass
class Security:
    accounts: Accounts
    audit: AuditLog
    keys: JwtKeys
    failures: SlidingWindow  # failed logins per client address
    registrations: SlidingWindow  # registrations per client address
    submissions: SlidingWindow  # updates per node
    new_admin_token: str | None = field(default=None, repr=False)  # made now: print it once

    @classmethod
    def build(cls, settings: ServerSettings, data_dir: Path, db: Database) -> Security:
        audit = AuditLog(db)
        accounts = Accounts(db, audit)
        given = settings.admin_token.get_secret_value() if settings.admin_token else None
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        return cls(
            accounts=accounts,
            audit=audit,
            keys=JwtKeys.load(data_dir, secret, settings.access_token_ttl_s),
            failures=SlidingWindow(settings.max_auth_failures_per_min),
            registrations=SlidingWindow(settings.max_registrations_per_min),
            submissions=SlidingWindow(settings.max_submissions_per_min),
            new_admin_token=accounts.ensure_admin(given),
        )

    def close(self) -> None:
        self.accounts.save_sequences()
        self.audit.close()
