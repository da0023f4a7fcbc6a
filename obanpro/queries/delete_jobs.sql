-- Deletes the given jobs, except executing ones, which finish first.
DELETE FROM {prefix}.oban_jobs
WHERE id = ANY($1::bigint[])
  AND state <> 'executing'
RETURNING id
