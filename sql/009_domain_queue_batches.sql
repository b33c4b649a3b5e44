-- With TPX_DOMAIN_DEFER, a batch's valid fixes wait for `tpx domain` as one row here, instead of
-- a row each in tpx_domain_missed (sql/008): one key a fix there cost the positions' transaction
-- a second primary-key insert a record (measured: ~6 µs of PostgreSQL's a record against ~0.5
-- for one row a batch; issue 16). fixes holds the batch's keys as lines "device_id ts_us"
-- (device ids never hold a space or a newline: CONTRACT.md); STORAGE EXTERNAL skips compressing
-- a value read once. The repair moves these rows' keys into tpx_domain_missed (one transaction:
-- a key is always in one of the two until it is taken), and a replay of late fixes from
-- positions leaves out the keys of both.
CREATE TABLE IF NOT EXISTS tpx_domain_queue (
    id        bigserial PRIMARY KEY,
    marked_at timestamptz NOT NULL DEFAULT now(),
    fixes     text NOT NULL
);
ALTER TABLE tpx_domain_queue ALTER COLUMN fixes SET STORAGE EXTERNAL;
