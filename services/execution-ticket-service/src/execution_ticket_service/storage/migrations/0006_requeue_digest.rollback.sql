ALTER TABLE tickets DROP COLUMN requeue_digest;
