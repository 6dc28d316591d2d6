DROP TRIGGER plan_tasks_count_statuses ON plan_tasks;
DROP FUNCTION plan_tasks_count_statuses();
ALTER TABLE plans DROP COLUMN counts;
