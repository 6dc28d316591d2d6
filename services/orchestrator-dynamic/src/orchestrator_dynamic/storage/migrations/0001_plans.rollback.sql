DROP TABLE plan_tasks;
DROP TABLE plans;
