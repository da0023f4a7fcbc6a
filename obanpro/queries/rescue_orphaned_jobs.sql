-- Rescues at most $3 executing jobs that were attempted more than $1 seconds
-- ago and whose producer (attempted_by[2]) has no row in oban_producers updated
-- within the last $2 seconds. As in oban-py, a job with attempts left becomes
-- available and one without is discarded; both get meta.rescued incremented.
-- A discarded job also gets an error entry with the reason, appended with ||,
-- which works for oban-py's jsonb and Elixir's jsonb[] errors column. SKIP
-- LOCKED leaves jobs whose ack is being written, and the lock rechecks the state.
WITH orphaned AS (
    SELECT j.id
    FROM {prefix}.oban_jobs j
    WHERE j.state = 'executing'
      AND j.attempted_at < timezone('UTC', now()) - make_interval(secs => $1)
      AND NOT EXISTS (
          SELECT 1
          FROM {prefix}.oban_producers p
          WHERE p.uuid::text = j.attempted_by[2]
            AND p.updated_at >= timezone('UTC', now()) - make_interval(secs => $2)
      )
    ORDER BY j.id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE {prefix}.oban_jobs j
SET state = CASE
        WHEN j.attempt >= j.max_attempts THEN 'discarded'::{prefix}.oban_job_state
        ELSE 'available'::{prefix}.oban_job_state
    END,
    discarded_at = CASE
        WHEN j.attempt >= j.max_attempts THEN timezone('UTC', now())
        ELSE j.discarded_at
    END,
    errors = CASE
        WHEN j.attempt >= j.max_attempts THEN j.errors || jsonb_build_object(
            'at', to_char(timezone('UTC', now()), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
            'attempt', j.attempt,
            'error', 'discarded by the lifeline: producer ' || coalesce(j.attempted_by[2], '(none)')
                || ' on node ' || coalesce(j.attempted_by[1], '(none)')
                || ' has no live row in oban_producers and the job has no attempts left'
        )
        ELSE j.errors
    END,
    meta = CASE WHEN jsonb_typeof(j.meta) = 'object' THEN j.meta ELSE '{}'::jsonb END
        || jsonb_build_object('rescued', CASE
            WHEN jsonb_typeof(j.meta->'rescued') = 'number' THEN floor((j.meta->>'rescued')::numeric) + 1
            ELSE 1
        END)
FROM orphaned
WHERE j.id = orphaned.id
  AND j.state = 'executing'
RETURNING j.id, j.state::text
