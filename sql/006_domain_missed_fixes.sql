-- Two additions to the domain's bookkeeping (issue 16).
--
-- missed_us: the time of each valid fix a failed batch lost, epoch microseconds, sorted (005 kept
-- only the oldest: a repair that replayed every fix since took the fixes already applied again).
-- The repair thread gives exactly these to the stage again, then clears them with missed_since.
--
-- adopted_at: when an instance last switched to a geofence generation (a reload that found it, or
-- a start), the database's clock. A writer that meets a device state stored under a generation
-- adopted after its own knows another instance has a newer set, even after an edit was reverted
-- (a generation is a digest of the set: a revert brings an old one back).
ALTER TABLE tpx_domain_devices ADD COLUMN IF NOT EXISTS missed_us bigint[];
ALTER TABLE tpx_domain_generations ADD COLUMN IF NOT EXISTS adopted_at timestamptz NOT NULL DEFAULT now();
