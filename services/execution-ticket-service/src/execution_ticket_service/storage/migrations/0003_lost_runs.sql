-- depends: 0002_narrow_outbox
-- Attempts that ended with their worker (stopped or lost), not with the task: they do not
-- use the task's retries (UpdateTicketStatusRequest.worker_lost).
ALTER TABLE tickets ADD COLUMN lost_runs integer NOT NULL DEFAULT 0 CHECK (lost_runs >= 0);
