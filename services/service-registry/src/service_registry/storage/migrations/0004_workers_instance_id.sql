-- depends: 0003_workers_gin_without_pending_list
-- The worker process that registered a name last (RegisterRequest.instance_id): Register
-- refuses another live process under the same name, which would share the worker_id and
-- run every assignment twice. '' = a client that sends none (no check). A constant default
-- only changes the catalogue: no table rewrite.
ALTER TABLE workers ADD COLUMN instance_id text NOT NULL DEFAULT '';
