-- Fetches the next available job of one queue for draining it in tests, as
-- fetch_jobs.sql does for one job. With $3 set, only jobs with an id up to
-- $3 are taken, so a single pass leaves the jobs inserted while it runs.
WITH locked AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state = 'available'
      AND queue = $1
      AND attempt < max_attempts
      AND ($3::bigint IS NULL OR id <= $3)
    ORDER BY priority, scheduled_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE {prefix}.oban_jobs j
SET state = 'executing',
    attempt = j.attempt + 1,
    attempted_at = timezone('UTC', now()),
    attempted_by = $2::text[]
FROM locked
WHERE j.id = locked.id
RETURNING
    j.id,
    j.queue,
    j.worker,
    j.attempt,
    j.max_attempts,
    j.priority,
    j.args::text,
    j.meta::text,
    to_jsonb(j.errors)::text,
    j.tags,
    j.attempted_by,
    j.inserted_at,
    j.scheduled_at,
    j.attempted_at
