-- depends: 0002_workers_analyze_often
-- Discovery searches the GIN indexes of capabilities and labels. With fastupdate (the
-- default) every registration and heartbeat (a heartbeat rewrites the row: its rank and
-- last_heartbeat_at are indexed) adds its entries to the index's pending list, which every
-- search reads in full until a vacuum merges it: at 10,000 workers the label lookup of a
-- discovery took 0.42 ms instead of 0.02, and a writer that fills the list past
-- gin_pending_list_limit merges it itself. Without the pending list, each write updates
-- the index at once and searches stay fast.
ALTER INDEX workers_capabilities_idx SET (fastupdate = off);
ALTER INDEX workers_labels_idx SET (fastupdate = off);
-- What is already pending is merged now, not at the next vacuum (PERFORM: the migration
-- runner prints the result of a SELECT to stdout, which broke JSON logs).
DO $$
BEGIN
    PERFORM gin_clean_pending_list('workers_capabilities_idx'::regclass);
    PERFORM gin_clean_pending_list('workers_labels_idx'::regclass);
END
$$;
