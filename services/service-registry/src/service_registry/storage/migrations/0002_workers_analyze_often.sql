-- depends: 0001_create_workers
-- Discovery's plan depends on fresh statistics of workers: after a registration burst the
-- defaults (analyse after 50 + 10% of the rows changed, noticed at the next autovacuum
-- round) left the planner scanning every row. Analyse after 2% + 100 changed rows instead;
-- a 10,000-row sample is cheap. The repository also analyses after large bursts itself.
ALTER TABLE workers SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 100);
