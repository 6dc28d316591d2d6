ALTER TABLE plan_tasks DROP COLUMN lost_runs;
