-- The keys of the deferred batches (sql/009) a row each, as the writers' statements that read
-- them in place see them: the replay of late fixes (HISTORY_SQL) and a cold device's resume
-- (READ_SQL). The text format "device_id ts_us" a line is decoded here, where the repair moves
-- the rows (UNQUEUE_SQL decodes what its DELETE returns) and in `tpx timing DEVICE` (which looks
-- for the device's line in each row before splitting it). A view costs nothing stored: the
-- planner inlines it. For an operator: the fixes waiting for `tpx domain`, a row each.
CREATE OR REPLACE VIEW tpx_domain_queued AS
SELECT q.id, q.marked_at, split_part(k, ' ', 1) AS device_id, split_part(k, ' ', 2)::int8 AS ts_us
FROM tpx_domain_queue AS q CROSS JOIN LATERAL string_to_table(q.fixes, E'\n') AS k;
