-- farebox store, version 0002: reconciliation of unfinished claims, and idempotency keys.

-- Partial: settled claims, nearly all of them, are never read by reconciliation again.
CREATE INDEX claims_unfinished ON claims (at, key) WHERE state <> 'settled';

-- `status` is NULL while the first request runs; `headers` is a JSON list of [name, value].
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL,
    at BIGINT NOT NULL,
    status INTEGER,
    headers TEXT,
    body BYTEA
);
