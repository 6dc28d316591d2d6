-- depends: 0001_plans
-- The driver follows tickets with one WatchTickets stream per replica (its cursor kept in
-- memory, plans re-read with ListTickets), so no per-plan cursor is stored.

ALTER TABLE plans DROP COLUMN watch_cursor;
