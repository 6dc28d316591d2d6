-- Run once by the postgres image's entrypoint on an empty data volume
-- (/docker-entrypoint-initdb.d): one database per service; each service applies its own
-- migrations at start-up. Owned by POSTGRES_USER, the role the services connect as.
CREATE DATABASE tickets;
CREATE DATABASE registry;
CREATE DATABASE orchestrator;
