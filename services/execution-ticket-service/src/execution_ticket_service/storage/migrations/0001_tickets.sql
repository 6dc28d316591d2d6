-- Execution tickets and their event log (transactional outbox + watch log).

CREATE TABLE tickets (
    -- Insertion order: the stable order of ListTickets and its keyset cursor.
    seq                   bigint GENERATED ALWAYS AS IDENTITY,
    ticket_id             uuid PRIMARY KEY,
    plan_id               text NOT NULL CHECK (length(plan_id) BETWEEN 1 AND 200),
    task_id               text NOT NULL CHECK (length(task_id) BETWEEN 1 AND 200),
    intent_id             text NOT NULL DEFAULT '',
    task_type             text NOT NULL CHECK (length(task_type) BETWEEN 1 AND 200),
    description           text NOT NULL DEFAULT '',
    parameters            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(parameters) = 'object'),
    required_capabilities jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(required_capabilities) = 'array'),
    depends_on            jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(depends_on) = 'array'),
    priority              text NOT NULL CHECK (priority IN ('LOW', 'NORMAL', 'HIGH', 'CRITICAL')),
    status                text NOT NULL CHECK (status IN ('PENDING', 'ASSIGNED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    attempt               integer NOT NULL CHECK (attempt >= 1),
    max_retries           integer NOT NULL CHECK (max_retries >= 0),
    timeout_seconds       integer NOT NULL CHECK (timeout_seconds > 0),
    worker_id             text CHECK (worker_id IS NULL OR length(worker_id) BETWEEN 1 AND 200),
    lease_expires_at      timestamptz,
    error_message         text NOT NULL DEFAULT '',
    result                jsonb,
    version               bigint NOT NULL CHECK (version >= 1),
    -- Fingerprint of the last applied status update (idempotent retries).
    last_update_digest    text NOT NULL DEFAULT '',
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    started_at            timestamptz,
    completed_at          timestamptz,
    CONSTRAINT tickets_plan_task_key UNIQUE (plan_id, task_id),
    CONSTRAINT tickets_lease_only_while_leased
        CHECK (lease_expires_at IS NULL OR status IN ('ASSIGNED', 'RUNNING')),
    CONSTRAINT tickets_worker_while_leased
        CHECK (status NOT IN ('ASSIGNED', 'RUNNING') OR worker_id IS NOT NULL)
);

CREATE UNIQUE INDEX tickets_seq_idx ON tickets (seq);
CREATE INDEX tickets_plan_seq_idx ON tickets (plan_id, seq);
CREATE INDEX tickets_status_seq_idx ON tickets (status, seq);
CREATE INDEX tickets_worker_seq_idx ON tickets (worker_id, seq) WHERE worker_id IS NOT NULL;
CREATE INDEX tickets_lease_due_idx ON tickets (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

CREATE TABLE ticket_events (
    seq                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction's id. Watchers read (xid, seq) in order and only below the
    -- oldest running transaction, so an event committed late can never be skipped.
    xid                 bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    event_id            uuid NOT NULL UNIQUE,
    event_type          text NOT NULL CHECK (event_type IN ('CREATED', 'ASSIGNED', 'STATUS_CHANGED', 'REQUEUED', 'LEASE_EXPIRED', 'LATE_RESULT_REJECTED')),
    ticket_id           uuid NOT NULL,
    plan_id             text NOT NULL,
    -- The worker the event concerns (also the one that lost a re-queued ticket).
    worker_id           text,
    previous_status     text,
    status              text NOT NULL,
    actor               text NOT NULL,
    occurred_at         timestamptz NOT NULL,
    -- The ticket row after the change, as to_jsonb(tickets).
    ticket              jsonb NOT NULL,
    details             jsonb NOT NULL DEFAULT '{}',
    -- Outbox bookkeeping for the MongoDB audit relay.
    relayed_at          timestamptz,
    relay_claimed_until timestamptz
);

CREATE INDEX ticket_events_position_idx ON ticket_events (xid, seq);
CREATE INDEX ticket_events_plan_position_idx ON ticket_events (plan_id, xid, seq);
CREATE INDEX ticket_events_worker_position_idx ON ticket_events (worker_id, xid, seq)
    WHERE worker_id IS NOT NULL;
CREATE INDEX ticket_events_unrelayed_idx ON ticket_events (seq) WHERE relayed_at IS NULL;
