CREATE OR REPLACE FUNCTION ticket_events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ticket_outbox (seq) SELECT seq FROM new_events;
    RETURN NULL;
END
$$;
