-- farebox store, version 0005: traffic is counted, and its events may be pruned.

-- Challenges, refusals and replays are what any client can make more of. Each is counted here as
-- it is appended (a few rows a day per route and code, whatever the traffic), and its event may
-- be deleted once old; every other event is the payment log and stays append-only.
CREATE TABLE traffic_counts (
    day BIGINT NOT NULL,
    kind TEXT NOT NULL,
    route TEXT NOT NULL,
    code TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (day, kind, route, code)
);

-- Pruning walks traffic events only: without this index it would read the whole payment log on
-- every pass. The kinds here and in the function below are farebox.store.base.TRAFFIC_KINDS (a
-- test compares them).
CREATE INDEX events_traffic ON events (id) WHERE kind IN ('challenge', 'refusal', 'replay');

CREATE OR REPLACE FUNCTION farebox_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.kind IN ('challenge', 'refusal', 'replay') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the payment log is append-only';
END
$$;
