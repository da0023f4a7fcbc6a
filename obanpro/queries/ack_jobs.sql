-- Acks a batch of finished jobs and, with a limit ($9) above 0, fetches new
-- jobs of one queue ($8) for the slots the batch frees, in one round trip.
-- The acked rows leave executing in the same statement where the fetched rows
-- enter it, so the count of executing rows never exceeds the slots held. The
-- attempt check makes a late ack a no-op when the job was rescued and fetched
-- again meanwhile. Errors are appended with ||, which works both for oban-py's
-- jsonb column and for Elixir's jsonb[] column. Columns 1-14 are those of
-- fetch_jobs.sql; the last column lists the acked ids on the first row only,
-- and a lone row with a NULL id comes back when nothing was fetched.
WITH acked AS (
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
),
locked AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state = 'available'
      AND queue = $8
      AND attempt < max_attempts
    ORDER BY priority, scheduled_at, id
    LIMIT $9
    FOR UPDATE SKIP LOCKED
),
fetched AS (
    UPDATE {prefix}.oban_jobs j
    SET state = 'executing',
        attempt = j.attempt + 1,
        attempted_at = timezone('UTC', now()),
        attempted_by = $10::text[]
    FROM locked
    WHERE j.id = locked.id
    RETURNING
        j.id,
        j.queue,
        j.worker,
        j.attempt,
        j.max_attempts,
        j.priority,
        j.args::text AS args,
        j.meta::text AS meta,
        to_jsonb(j.errors)::text AS errors,
        j.tags,
        j.attempted_by,
        j.inserted_at,
        j.scheduled_at,
        j.attempted_at
),
numbered AS (
    SELECT row_number() OVER () AS n, fetched.* FROM fetched
)
SELECT
    f.id, f.queue, f.worker, f.attempt, f.max_attempts, f.priority, f.args, f.meta, f.errors,
    f.tags, f.attempted_by, f.inserted_at, f.scheduled_at, f.attempted_at,
    CASE WHEN f.n IS NULL OR f.n = 1 THEN a.ids END AS acked_ids
FROM (SELECT coalesce(array_agg(id), ARRAY[]::bigint[]) AS ids FROM acked) a
LEFT JOIN numbered f ON true
