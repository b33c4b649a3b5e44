-- The two tables of deploy/directus/snapshot.yaml for a PostgreSQL without PostGIS: the same
-- columns and types as `directus schema apply` creates, except `geofences.geometry`, which is
-- jsonb holding a GeoJSON geometry (longitude first, EPSG:4326) instead of geometry(Geometry,4326).
-- tests/test_directus.py checks that the two stay column for column the same.
-- Run in the schema the tables belong in (search_path); idempotent.

CREATE TABLE IF NOT EXISTS geofences (
    id            serial PRIMARY KEY,
    name          varchar(255) NOT NULL,
    kind          varchar(255) NOT NULL,  -- zone | gate | circle
    geometry      jsonb NOT NULL,         -- GeoJSON: zone Polygon/MultiPolygon, gate LineString, circle Point
    radius_m      real,                   -- circles
    exit_margin_m real NOT NULL DEFAULT '0',
    active        boolean NOT NULL DEFAULT true,
    date_updated  timestamptz             -- Directus sets it on edits through its API
);

CREATE TABLE IF NOT EXISTS timing_records (
    id            uuid PRIMARY KEY,       -- no default: tpx derives it from device, geofence, event, time
    device_id     varchar(255) NOT NULL,
    event         varchar(255) NOT NULL,  -- enter | exit | cross
    ts            timestamptz NOT NULL,
    latitude      numeric(10, 7) NOT NULL, -- exact to 1e-7 degree (Directus has no double type)
    longitude     numeric(10, 7) NOT NULL,
    speed         real,
    direction     integer,                -- gates: 1 left to right, -1 right to left
    uncertainty_s real,
    date_created  timestamptz,
    geofence      integer NOT NULL
        CONSTRAINT timing_records_geofence_foreign REFERENCES geofences (id) ON DELETE RESTRICT
);

CREATE INDEX IF NOT EXISTS timing_records_device_id_index ON timing_records (device_id);
-- the newest records (tpx top's Timing tab, tpx timing): an index scan, not a scan of the table
CREATE INDEX IF NOT EXISTS timing_records_ts_index ON timing_records (ts);
