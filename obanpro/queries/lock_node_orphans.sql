-- Locks the executing jobs that a previous run of this node left behind: fetched
-- by this node name, by a producer that is not one of this run's and has no
-- fresh row in oban_producers. Jobs attempted in the last second are skipped,
-- so a node of the same name starting at this moment keeps its first fetches.
SELECT j.id, j.worker, j.queue, j.attempt, j.max_attempts, j.priority, j.args::text, j.meta::text, j.tags,
       j.attempted_by, j.scheduled_at, j.attempted_at
FROM {prefix}.oban_jobs j
WHERE j.state = 'executing'
  AND j.attempted_by[1] = $1
  AND NOT (j.attempted_by[2] = ANY($2::text[]))
  AND j.attempted_at < timezone('UTC', now()) - interval '1 second'
  AND NOT EXISTS (
      SELECT 1
      FROM {prefix}.oban_producers p
      WHERE p.uuid::text = j.attempted_by[2]
        AND p.updated_at > timezone('UTC', now()) - make_interval(secs => $3)
  )
FOR UPDATE OF j SKIP LOCKED
