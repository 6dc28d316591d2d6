CREATE OR REPLACE FUNCTION ticket_events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    this_xid bigint := pg_current_xact_id()::text::bigint;
    younger boolean;
BEGIN
    -- Most statements end here: no younger transaction has written an event yet (one
    -- step down the position index).
    IF (SELECT max(xid) FROM ticket_events) > this_xid THEN
        -- Planned for this xid each time: a cached generic plan of "xid > $1" may read
        -- the whole log instead of the index range of the younger transactions' events.
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM ticket_events e WHERE e.xid > $1'
                ' AND e.ticket_id IN (SELECT n.ticket_id FROM new_events n'
                ' WHERE n.event_type <> ''CREATED''))'
            INTO younger USING this_xid;
        IF younger THEN
            RAISE EXCEPTION 'a ticket of this transaction was changed by a younger one meanwhile'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    INSERT INTO ticket_outbox (seq) SELECT seq FROM new_events;
    RETURN NULL;
END
$$;
