-- depends: 0006_requeue_digest
-- Withdraws the check 0005 put in the outbox trigger. Failing a statement that wrote a
-- ticket's change behind a younger transaction's change of it (serialization_failure, for
-- the service to retry) aborted whole group commits under contention, unrelated callers'
-- changes with them, and it missed late results. WatchTickets readers order a ticket's
-- racing events by ticket.version instead (as they do repeats).
CREATE OR REPLACE FUNCTION ticket_events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ticket_outbox (seq) SELECT seq FROM new_events;
    RETURN NULL;
END
$$;
