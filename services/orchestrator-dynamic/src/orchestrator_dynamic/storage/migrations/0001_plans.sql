-- The orchestrator's own state: submitted plans, what it last knew of each task's ticket,
-- and which replica drives each plan (a lease with an epoch that fences writes).

CREATE TABLE plans (
    plan_id                text PRIMARY KEY,
    intent_id              text NOT NULL DEFAULT '',
    name                   text NOT NULL DEFAULT '',
    priority               text NOT NULL
        CHECK (priority IN ('LOW', 'NORMAL', 'HIGH', 'CRITICAL')),
    -- The normalised plan body (Plan.to_json()); body_hash is computed from the submitted
    -- body once and compared on resubmission, never recomputed from this JSONB copy.
    body                   jsonb NOT NULL,
    body_hash              text NOT NULL,
    task_count             integer NOT NULL CHECK (task_count > 0),
    status                 text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    error_message          text,
    cancel_requested_at    timestamptz,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    -- When the status became terminal.
    completed_at           timestamptz,
    -- When every ticket was terminal: nothing left to drive (resume skips it).
    settled_at             timestamptz,
    -- Ownership lease; owner_epoch increments on every claim.
    owner_id               text,
    owner_epoch            bigint NOT NULL DEFAULT 0,
    owner_lease_expires_at timestamptz,
    -- Last WatchTickets cursor fully applied.
    watch_cursor           text,
    CONSTRAINT plans_owner_has_lease CHECK ((owner_id IS NULL) = (owner_lease_expires_at IS NULL)),
    CONSTRAINT plans_terminal_has_completed_at CHECK (
        (status IN ('COMPLETED', 'FAILED', 'CANCELLED')) = (completed_at IS NOT NULL)
    )
);

-- Listing, newest first, with a keyset cursor on (created_at, plan_id).
CREATE INDEX plans_created_idx ON plans (created_at DESC, plan_id DESC);
CREATE INDEX plans_status_created_idx ON plans (status, created_at DESC, plan_id DESC);
-- Resume / claim: plans with something left to drive.
CREATE INDEX plans_unsettled_idx ON plans (created_at, plan_id) WHERE settled_at IS NULL;

CREATE TABLE plan_tasks (
    plan_id          text NOT NULL REFERENCES plans (plan_id) ON DELETE CASCADE,
    task_id          text NOT NULL,
    position         integer NOT NULL,
    -- NULL until the ticket service created the ticket (C2).
    ticket_id        text UNIQUE,
    status           text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'ASSIGNED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    attempt          integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    worker_id        text,
    error_message    text,
    lease_expires_at timestamptz,
    -- The ticket's version when last observed; older observations are ignored.
    ticket_version   bigint NOT NULL DEFAULT 0,
    -- Retry backoff, valid only for attempt = backoff_attempt.
    backoff_until    timestamptz,
    backoff_attempt  integer,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (plan_id, task_id),
    CONSTRAINT plan_tasks_position_unique UNIQUE (plan_id, position),
    CONSTRAINT plan_tasks_backoff_pair CHECK ((backoff_until IS NULL) = (backoff_attempt IS NULL))
);
