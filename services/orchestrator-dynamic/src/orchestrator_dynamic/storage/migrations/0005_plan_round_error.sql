-- depends: 0004_plan_task_lost_runs
-- Why the plan's scheduling rounds keep failing (e.g. every assignment refused by the
-- ticket service), and since when: explain says so instead of "ready".
ALTER TABLE plans ADD COLUMN round_error text, ADD COLUMN round_failed_at timestamptz;
