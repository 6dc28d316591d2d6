ALTER TABLE ticket_events ADD COLUMN relayed_at timestamptz, ADD COLUMN relay_claimed_until timestamptz;
UPDATE ticket_events e SET relayed_at = now()
    WHERE NOT EXISTS (SELECT 1 FROM ticket_outbox o WHERE o.seq = e.seq);
CREATE INDEX ticket_events_unrelayed_idx ON ticket_events (seq) WHERE relayed_at IS NULL;
DROP TRIGGER ticket_events_outbox ON ticket_events;
DROP FUNCTION ticket_events_to_outbox();
DROP TABLE ticket_outbox;
