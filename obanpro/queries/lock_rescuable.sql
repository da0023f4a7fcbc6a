-- Locks the executing jobs fetched by the given producers, for accurate rescue.
SELECT id, worker, queue, attempt, max_attempts, priority, args::text, meta::text, tags,
       attempted_by, scheduled_at, attempted_at
FROM {prefix}.oban_jobs
WHERE state = 'executing'
  AND attempted_by[2] = ANY($1::text[])
FOR UPDATE
