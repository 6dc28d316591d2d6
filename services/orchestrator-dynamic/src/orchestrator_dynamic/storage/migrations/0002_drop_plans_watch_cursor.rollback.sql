ALTER TABLE plans ADD COLUMN watch_cursor text;
