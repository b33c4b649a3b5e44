-- The domain stage's own bookkeeping (issue 16). tpx owns these; the geofences and
-- timing_records tables belong to the CMS (Directus) and are never created or altered here.
--
-- One row per device the domain has seen: its state, compact (membership, last kept fix and a
-- few checkpoints back to the late window's start; never the fixes themselves, which are in
-- positions), and a version bumped by every transaction that changes it. A writer takes the
-- device's advisory lock, compares the version with the one it holds in memory and reloads
-- the state when another writer or instance moved it on: that is what keeps timing records
-- exact with any number of instances.
CREATE TABLE IF NOT EXISTS tpx_domain_devices (
    device_id  text COLLATE "C" PRIMARY KEY,
    version    bigint NOT NULL,
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Each geofence set a writer has used: its generation (a digest) and every geofence's
-- fingerprint, so that an instance reading a device state written under a generation it has
-- not loaded itself can still tell which geofences changed since.
CREATE TABLE IF NOT EXISTS tpx_domain_generations (
    generation   text PRIMARY KEY,
    fingerprints jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
