-- depends: 0001_tickets
-- The audit relay's bookkeeping moves to a narrow table of the events not yet relayed, so an
-- event row is written once. Claiming and marking used to update the wide event row twice
-- (a new copy of the row and of its index entries each time, never a HOT update since
-- relayed_at was in an index predicate): ~60 % of the WAL written per event.

CREATE TABLE ticket_outbox (
    -- ticket_events.seq of an event the relay has not delivered yet; deleted once delivered.
    seq           bigint PRIMARY KEY,
    -- A relay replica works on the event until then (others skip it).
    claimed_until timestamptz
) WITH (fillfactor = 50);  -- room in each page for the claim's HOT update

INSERT INTO ticket_outbox (seq) SELECT seq FROM ticket_events WHERE relayed_at IS NULL;

-- Every event enters the outbox in the statement that writes it, whichever statement that is.
CREATE FUNCTION ticket_events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ticket_outbox (seq) SELECT seq FROM new_events;
    RETURN NULL;
END
$$;

CREATE TRIGGER ticket_events_outbox AFTER INSERT ON ticket_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION ticket_events_to_outbox();

DROP INDEX ticket_events_unrelayed_idx;
ALTER TABLE ticket_events DROP COLUMN relayed_at, DROP COLUMN relay_claimed_until;
