DROP INDEX tickets_worker_active_idx;
