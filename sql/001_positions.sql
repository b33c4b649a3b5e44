-- positions: one row per GPS fix (CONTRACT.md §2). Owned by tpx.
-- The primary key includes ts, so it stays valid when the table becomes a
-- TimescaleDB hypertable on ts (unique keys on a hypertable must include ts).
CREATE TABLE IF NOT EXISTS positions (
    device_id    text             NOT NULL,
    ts           timestamptz      NOT NULL,
    latitude     double precision NOT NULL,
    longitude    double precision NOT NULL,
    altitude     real,
    angle        real,
    speed        real,
    satellites   smallint,
    priority     smallint,
    event_io_id  integer,
    valid        boolean          NOT NULL,
    attributes   jsonb            NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz,
    ingested_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, ts)
);

COMMENT ON TABLE positions IS 'GPS positions written by tpx; see CONTRACT.md';
