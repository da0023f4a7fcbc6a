-- Cancels the given jobs that have not started, and reports the executing
-- ones without changing them: the node running each of those gets a pkill
-- signal and acks the job as cancelled once it stops. Rows are locked in id
-- order so two bulk cancels cannot deadlock. Completed, discarded and
-- cancelled jobs are left alone.
WITH locked AS (
    SELECT id, state
    FROM {prefix}.oban_jobs
    WHERE id = ANY($1::bigint[])
      AND state IN ('executing', 'available', 'scheduled', 'retryable', 'suspended')
    ORDER BY id
    FOR UPDATE
),
cancelled AS (
    UPDATE {prefix}.oban_jobs j
    SET state = 'cancelled',
        cancelled_at = timezone('UTC', now()),
        meta = j.meta || jsonb_build_object('cancel_attempted_at', timezone('UTC', now()))
    FROM locked
    WHERE j.id = locked.id
      AND locked.state <> 'executing'
    RETURNING j.id
)
SELECT locked.id, locked.state::text
FROM locked
ORDER BY locked.id
