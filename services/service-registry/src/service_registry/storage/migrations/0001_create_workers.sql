-- Live workers. Health is derived from last_heartbeat_at at read time (so every replica
-- agrees without waiting for the sweeper); marked_unhealthy records that the UNHEALTHY
-- transition was announced, and draining is sticky until the worker registers again.
CREATE TABLE workers (
    worker_id          uuid PRIMARY KEY,
    namespace          text NOT NULL,
    name               text NOT NULL,
    capabilities       text[] NOT NULL,
    labels             jsonb NOT NULL DEFAULT '{}'::jsonb,
    max_concurrent     integer NOT NULL CHECK (max_concurrent >= 1),
    in_flight          integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    version            text NOT NULL DEFAULT '',
    draining           boolean NOT NULL DEFAULT false,
    marked_unhealthy   boolean NOT NULL DEFAULT false,
    registered_at      timestamptz NOT NULL,
    last_heartbeat_at  timestamptz NOT NULL,
    succeeded_total    bigint NOT NULL DEFAULT 0 CHECK (succeeded_total >= 0),
    failed_total       bigint NOT NULL DEFAULT 0 CHECK (failed_total >= 0),
    success_rate       double precision NOT NULL DEFAULT 1.0,
    -- Discovery order (ranking.py): written with every registration and heartbeat.
    rank_key           double precision NOT NULL,
    -- Fixed per worker (derived from worker_id); breaks ranking ties, see ranking.py.
    tiebreak           bigint NOT NULL,
    CONSTRAINT workers_namespace_name_key UNIQUE (namespace, name)
);

-- Discovery: capability containment (@>) and label equality (@>) use GIN indexes.
CREATE INDEX workers_capabilities_idx ON workers USING gin (capabilities);
CREATE INDEX workers_labels_idx ON workers USING gin (labels jsonb_path_ops);
-- Discovery reads the best candidates in this order and stops after a few.
CREATE INDEX workers_rank_idx ON workers (namespace, rank_key DESC);
-- Sweeper and health filters.
CREATE INDEX workers_last_heartbeat_idx ON workers (last_heartbeat_at);

-- Append-only log behind WatchWorkers. Writers take a transaction advisory lock before
-- inserting, so sequence order is commit order and a reader never skips an event.
CREATE TABLE worker_events (
    sequence     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    type         text NOT NULL,
    worker_id    uuid NOT NULL,
    namespace    text NOT NULL,
    worker       jsonb NOT NULL,
    occurred_at  timestamptz NOT NULL
);

CREATE INDEX worker_events_occurred_at_idx ON worker_events (occurred_at);
