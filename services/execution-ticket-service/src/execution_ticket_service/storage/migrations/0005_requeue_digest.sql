-- depends: 0004_worker_active_tickets
-- The digest of the failure report that re-queued a ticket last (Ticket.requeue_digest):
-- that report, retried after the next attempt reported something, is an identical retry
-- (same answer, no event), not a late result of the attempt it ended.
ALTER TABLE tickets ADD COLUMN requeue_digest text NOT NULL DEFAULT '';
