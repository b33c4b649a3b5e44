-- Devices whose timing records a batch missed (issue 16). When the CMS's timing table refuses
-- the domain stage's query or a value (a column dropped in Directus, a foreign key), only the
-- stage's savepoint rolls back: the positions commit, and the same transaction records here the
-- time of the oldest fix each device lost. Every instance's repair thread then replays each such
-- device from that time (its fixes are in positions) once the stage works again, under the
-- device's lock, and clears it. Writers never change it, so their updates stay HOT.
ALTER TABLE tpx_domain_devices ADD COLUMN IF NOT EXISTS missed_since timestamptz;
CREATE INDEX IF NOT EXISTS tpx_domain_devices_missed
    ON tpx_domain_devices (device_id) WHERE missed_since IS NOT NULL;
