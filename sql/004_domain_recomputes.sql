-- Every `tpx timing recompute` that changed timing records (issue 16): when, by whom, for what,
-- and what it did. The audit trail of replaced records for whoever looks at them later, and what
-- `tpx serve` counts in tpx_timing_recomputes. tpx's own table, like tpx_domain_devices.
CREATE TABLE IF NOT EXISTS tpx_domain_recomputes (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    by_role    text NOT NULL DEFAULT current_user,
    geofence   text,
    device_id  text,
    since      timestamptz NOT NULL,
    until      timestamptz,
    devices    integer NOT NULL,
    removed    integer NOT NULL,
    written    integer NOT NULL
);
