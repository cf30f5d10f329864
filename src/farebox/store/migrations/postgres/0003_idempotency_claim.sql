-- farebox store, version 0003: the proof claim a running idempotent request spent.

-- The claim key of that proof, so that a retry finding the entry left running (its process died)
-- can tell whether the money moved. NULL for entries written before this version.
ALTER TABLE idempotency ADD COLUMN claim TEXT;
