-- depends: 0003_plan_task_counts
-- A ticket's attempts that ended with their worker (the ticket service's lost_runs): they
-- used none of the task's retries, so a task's attempts are max_retries + 1 + lost_runs.
ALTER TABLE plan_tasks ADD COLUMN lost_runs integer NOT NULL DEFAULT 0;
