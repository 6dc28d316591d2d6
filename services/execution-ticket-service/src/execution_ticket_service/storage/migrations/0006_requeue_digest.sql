-- depends: 0005_events_in_change_order
-- The digest of the failure report that re-queued a ticket last (Ticket.requeue_digest):
-- that report, retried after the next attempt reported something, is an identical retry
-- (same answer, no event), not a late result of the attempt it ended.
-- IF NOT EXISTS: a development build of the same day applied it as 0005_requeue_digest.
ALTER TABLE tickets ADD COLUMN IF NOT EXISTS requeue_digest text NOT NULL DEFAULT '';
