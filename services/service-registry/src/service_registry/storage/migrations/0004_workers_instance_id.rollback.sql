ALTER TABLE workers DROP COLUMN instance_id;
