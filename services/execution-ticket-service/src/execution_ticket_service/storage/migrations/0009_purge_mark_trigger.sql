-- depends: 0008_purge_mark
-- The purge mark moves with every delete from the event log, whatever code deletes: a
-- replica of a release before 0008 purges without moving it, and a reader of this release
-- would then stream across the gap instead of refusing its position.
CREATE OR REPLACE FUNCTION ticket_events_purge_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ticket_events_purged m SET xid = d.xid, seq = d.seq
    FROM (SELECT xid, seq FROM old_events ORDER BY xid DESC, seq DESC LIMIT 1) d
    WHERE (d.xid, d.seq) > (m.xid, m.seq);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS ticket_events_purge_mark ON ticket_events;
CREATE TRIGGER ticket_events_purge_mark AFTER DELETE ON ticket_events
    REFERENCING OLD TABLE AS old_events
    FOR EACH STATEMENT EXECUTE FUNCTION ticket_events_purge_mark();
