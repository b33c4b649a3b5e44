-- device_id compares byte by byte (COLLATE "C"). Device ids are ASCII (CONTRACT.md §1), so
-- equality and order are the same as under any deterministic collation of the database, but
-- every comparison in the primary key's btree and in the writer's sort becomes a memcmp
-- instead of a locale-aware strcoll: -6 % PostgreSQL instructions per row written
-- (callgrind; README.md, "Speed"). The column stays `text` (CONTRACT.md §2).
--
-- Changing a column's collation rebuilds its indexes under an ACCESS EXCLUSIVE lock, so it
-- is done here only while positions is empty (a new install). On a table that already holds
-- rows nothing changes (tpx works the same, a little slower) and a NOTICE says how to do it
-- in a maintenance window (OPERATIONS.md, "device_id collation"). Anything that refuses the
-- change (e.g. a TimescaleDB hypertable with compression enabled) is reported the same way.
DO $$
BEGIN
    IF (SELECT attcollation FROM pg_attribute
         WHERE attrelid = 'positions'::regclass AND attname = 'device_id') = 'pg_catalog."C"'::regcollation THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM positions LIMIT 1) THEN
        RAISE NOTICE 'tpx: positions.device_id keeps its collation (the table holds rows); see OPERATIONS.md "device_id collation"';
        RETURN;
    END IF;
    BEGIN
        ALTER TABLE positions ALTER COLUMN device_id TYPE text COLLATE "C";
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'tpx: positions.device_id keeps its collation: %', SQLERRM;
    END;
END
$$;
