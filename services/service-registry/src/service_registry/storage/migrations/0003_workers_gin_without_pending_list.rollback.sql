ALTER INDEX workers_capabilities_idx RESET (fastupdate);
ALTER INDEX workers_labels_idx RESET (fastupdate);
