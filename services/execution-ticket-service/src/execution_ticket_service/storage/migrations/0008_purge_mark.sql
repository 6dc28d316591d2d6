-- depends: 0007_events_in_write_order
-- How far the event purge has deleted: the newest position (xid, seq) of an event it
-- deleted. A WatchTickets cursor before it would miss events; the service refuses it
-- instead (the client watches again from "now" or with a snapshot). Purges made before
-- this migration are not known: (0, 0).
CREATE TABLE IF NOT EXISTS ticket_events_purged (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    xid      bigint NOT NULL,
    seq      bigint NOT NULL
);
INSERT INTO ticket_events_purged (xid, seq) VALUES (0, 0) ON CONFLICT DO NOTHING;
