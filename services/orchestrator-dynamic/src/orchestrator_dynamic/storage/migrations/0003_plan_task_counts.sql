-- depends: 0002_drop_plans_watch_cursor
-- Each plan's task count per ticket status, kept on the plan row: a plan summary (and a
-- plan list, one summary per plan) counted every task of the plan before. A new plan's
-- tasks are all PENDING (PlanRepository.create writes that count); a statement trigger
-- applies every status change from the update's transition tables, which hold exactly the
-- row versions it replaced and wrote.

ALTER TABLE plans ADD COLUMN counts jsonb NOT NULL DEFAULT '{}'::jsonb;

UPDATE plans p
   SET counts = COALESCE(
       (SELECT jsonb_object_agg(s.status, s.n)
          FROM (SELECT t.status, count(*) AS n FROM plan_tasks t
                 WHERE t.plan_id = p.plan_id GROUP BY t.status) s),
       '{}'::jsonb);

CREATE FUNCTION plan_tasks_count_statuses() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH moved AS (
        SELECT n.plan_id, n.status AS new_status, o.status AS old_status
          FROM new_rows n JOIN old_rows o USING (plan_id, task_id)
         WHERE n.status <> o.status
    )
    UPDATE plans p
       SET counts = (
           SELECT COALESCE(jsonb_object_agg(c.status, c.n) FILTER (WHERE c.n <> 0), '{}'::jsonb)
             FROM (SELECT c.status, sum(c.n) AS n
                     FROM (SELECT e.key AS status, e.value::bigint AS n
                             FROM jsonb_each_text(p.counts) e
                           UNION ALL
                           SELECT m.new_status, 1 FROM moved m WHERE m.plan_id = p.plan_id
                           UNION ALL
                           SELECT m.old_status, -1 FROM moved m WHERE m.plan_id = p.plan_id) c
                    GROUP BY c.status) c)
     WHERE p.plan_id IN (SELECT plan_id FROM moved);
    RETURN NULL;
END
$$;

CREATE TRIGGER plan_tasks_count_statuses
    AFTER UPDATE ON plan_tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION plan_tasks_count_statuses();
