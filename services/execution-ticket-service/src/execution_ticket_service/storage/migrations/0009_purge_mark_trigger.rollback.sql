DROP TRIGGER IF EXISTS ticket_events_purge_mark ON ticket_events;
DROP FUNCTION IF EXISTS ticket_events_purge_mark();
