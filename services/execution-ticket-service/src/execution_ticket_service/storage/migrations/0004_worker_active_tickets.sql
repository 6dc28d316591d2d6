-- depends: 0003_lost_runs
-- The tickets a worker holds (ASSIGNED or RUNNING), counted by every assignment that names
-- the worker's capacity: a small index, whatever number of finished tickets a worker ran.
CREATE INDEX tickets_worker_active_idx ON tickets (worker_id) WHERE status IN ('ASSIGNED', 'RUNNING');
