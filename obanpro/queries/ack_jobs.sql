-- One UPDATE for a batch of finished jobs. The attempt check makes a late ack
-- a no-op when the job was rescued and fetched again meanwhile. Errors are
-- appended with ||, which works both for oban-py's jsonb column and for
-- Elixir's jsonb[] column.
UPDATE {prefix}.oban_jobs j
SET state = a.state::{prefix}.oban_job_state,
    completed_at = CASE WHEN a.state = 'completed' THEN timezone('UTC', now()) ELSE j.completed_at END,
    cancelled_at = CASE WHEN a.state = 'cancelled' THEN timezone('UTC', now()) ELSE j.cancelled_at END,
    discarded_at = CASE WHEN a.state = 'discarded' THEN timezone('UTC', now()) ELSE j.discarded_at END,
    scheduled_at = CASE
        WHEN a.schedule_in IS NULL THEN j.scheduled_at
        ELSE timezone('UTC', now()) + make_interval(secs => a.schedule_in)
    END,
    attempt = j.attempt + a.attempt_change,
    errors = CASE WHEN a.error IS NULL THEN j.errors ELSE j.errors || a.error::jsonb END,
    meta = CASE WHEN a.meta IS NULL THEN j.meta ELSE j.meta || a.meta::jsonb END
FROM unnest(
    $1::bigint[],
    $2::int[],
    $3::text[],
    $4::int[],
    $5::float8[],
    $6::text[],
    $7::text[]
) AS a(id, attempt, state, attempt_change, schedule_in, error, meta)
WHERE j.id = a.id
  AND j.state = 'executing'
  AND j.attempt = a.attempt
RETURNING j.id
