-- The fixes a failed batch missed, one row each (issue 16), instead of 006's missed_us array: an
-- array grew with an outage, and every batch of the outage read it and wrote it whole again, so
-- the cost grew with the square of the outage's length. A failed batch now inserts its fixes'
-- keys here and sets tpx_domain_devices.missed_since once (the oldest, for whoever reads the
-- table); the repair deletes each fix's row as it gives the fix back to the stage, and clears
-- missed_since when none is left. A replay of late fixes from positions leaves these out.
CREATE TABLE IF NOT EXISTS tpx_domain_missed (
    device_id text COLLATE "C" NOT NULL,
    ts        timestamptz NOT NULL,
    PRIMARY KEY (device_id, ts)
);
INSERT INTO tpx_domain_missed (device_id, ts)
SELECT device_id, to_timestamp(0) + t * interval '1 microsecond'
FROM tpx_domain_devices CROSS JOIN LATERAL unnest(missed_us) AS t
WHERE missed_us IS NOT NULL
ON CONFLICT DO NOTHING;
ALTER TABLE tpx_domain_devices DROP COLUMN IF EXISTS missed_us;
