-- tpx_domain_missed becomes the one record of the fixes whose timing records are still to be
-- written (issue 16): a failed batch's, and with TPX_DOMAIN_DEFER every batch's, which
-- `tpx domain` takes from here. Writers only insert new keys into it (never a device's row, so
-- they never wait for the repair's device locks); the repair reads what waits from it and
-- deletes each fix it gives back. marked_at (the batch's transaction time) gives the domain
-- lag of a deferred fix. tpx_domain_devices.missed_since (sql/005), which said the same per
-- device under the device's lock, is no longer read or written; it stays (with its index) for
-- the instances of the release before, which read it during a rolling deploy, and goes in a
-- later migration.
ALTER TABLE tpx_domain_missed ADD COLUMN IF NOT EXISTS marked_at timestamptz NOT NULL DEFAULT now();
