ALTER TABLE workers RESET (autovacuum_analyze_scale_factor, autovacuum_analyze_threshold);
