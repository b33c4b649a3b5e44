-- Devices whose timing records a batch missed (issue 16). When the CMS's timing table refuses
-- the domain stage's query or a value (a column dropped in Directus, a foreign key), only the
-- stage's savepoint rolls back: the positions commit, and the same transaction records here the
-- time of each valid fix the device lost (missed_us, epoch microseconds, sorted) and the oldest
-- (missed_since, for whoever reads the table). Every instance's repair thread then gives those
-- fixes to the stage again, as late ones, under the device's lock, once the stage works again,
-- and clears them. Writers never change these columns, so their updates stay HOT.
ALTER TABLE tpx_domain_devices ADD COLUMN IF NOT EXISTS missed_since timestamptz;
ALTER TABLE tpx_domain_devices ADD COLUMN IF NOT EXISTS missed_us bigint[];
CREATE INDEX IF NOT EXISTS tpx_domain_devices_missed
    ON tpx_domain_devices (device_id) WHERE missed_since IS NOT NULL;
