-- Makes due scheduled and retryable jobs of the given queues available, and
-- notifies each queue that received jobs so idle producers wake at once.
WITH due AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state IN ('scheduled', 'retryable')
      AND scheduled_at <= timezone('UTC', now())
      AND queue = ANY($1::text[])
    ORDER BY scheduled_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
staged AS (
    UPDATE {prefix}.oban_jobs j
    SET state = 'available'
    FROM due
    WHERE j.id = due.id
    RETURNING j.queue
)
SELECT s.queue, count(*)::int AS staged,
       pg_notify('{prefix}.oban_insert', '{"queue":' || to_json(s.queue)::text || '}')
FROM staged s
GROUP BY s.queue
