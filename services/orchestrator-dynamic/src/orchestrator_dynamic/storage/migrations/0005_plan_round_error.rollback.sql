ALTER TABLE plans DROP COLUMN round_error, DROP COLUMN round_failed_at;
