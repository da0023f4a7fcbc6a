-- Makes the given jobs available now, except those already available or
-- executing. A job out of attempts gets one more. The unique-jobs state bits
-- are cleared where a job has them, so a retried unique job is not treated
-- as a duplicate of itself. Each queue that received jobs is notified, so
-- idle producers fetch at once instead of at their next poll.
WITH retried AS (
    UPDATE {prefix}.oban_jobs
    SET state = 'available',
        max_attempts = GREATEST(max_attempts, attempt + 1),
        scheduled_at = timezone('UTC', now()),
        completed_at = NULL,
        cancelled_at = NULL,
        discarded_at = NULL,
        meta = CASE WHEN meta ? 'uniq_bmp' THEN jsonb_set(meta, '{uniq_bmp}', '[]'::jsonb) ELSE meta END
    WHERE id = ANY($1::bigint[])
      AND state NOT IN ('available', 'executing')
    RETURNING id, queue
),
notified AS (
    SELECT pg_notify('{prefix}.oban_insert', '{"queue":' || to_json(q.queue)::text || '}')
    FROM (SELECT DISTINCT queue FROM retried) q
)
SELECT r.id
FROM retried r, (SELECT count(*) FROM notified) n
ORDER BY r.id
