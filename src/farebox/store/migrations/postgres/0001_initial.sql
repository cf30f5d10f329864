-- farebox store, version 0001: payment claims and the append-only event log.

-- One row per payment proof ever accepted: the primary key makes a claim (INSERT ... ON CONFLICT
-- DO NOTHING) atomic across every process and host sharing the database.
CREATE TABLE claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('held', 'settled', 'pending')),
    at BIGINT NOT NULL,
    txn TEXT
);

-- `data` is TEXT, not JSONB: JSONB reads numbers as numeric and would be exact, but TEXT keeps
-- exactly the bytes farebox wrote, the same as SQLite, and costs no parsing on insert.
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    at BIGINT NOT NULL,
    route TEXT NOT NULL DEFAULT '',
    payer TEXT,
    payer_key TEXT,
    reference TEXT,
    data TEXT NOT NULL DEFAULT '{}'
);

-- The same indexes as SQLite's; partial ones skip events without a payer or a reference.
CREATE INDEX events_payer_at ON events (payer_key, at) WHERE payer_key IS NOT NULL;
CREATE INDEX events_route_at ON events (route, at);
CREATE INDEX events_at ON events (at);
CREATE INDEX events_reference ON events (reference) WHERE reference IS NOT NULL;

CREATE FUNCTION farebox_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the payment log is append-only';
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
FOR EACH ROW EXECUTE FUNCTION farebox_events_append_only();
