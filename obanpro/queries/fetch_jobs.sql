WITH locked AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state = 'available'
      AND queue = $1
      AND attempt < max_attempts
    ORDER BY priority, scheduled_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE {prefix}.oban_jobs j
SET state = 'executing',
    attempt = j.attempt + 1,
    attempted_at = timezone('UTC', now()),
    attempted_by = $3::text[]
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
