ALTER TABLE tickets DROP COLUMN lost_runs;
