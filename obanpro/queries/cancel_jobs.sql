-- Cancels the given jobs that have not started, and the executing ones that
-- no live producer runs: attempted over $2 seconds ago, with a producer row
-- missing or older than that, as after a node was killed. The attempt's age
-- spares a node that has just started, whose producer rows may not be
-- written yet. Executing jobs with a live producer keep their row: the node
-- running each gets a pkill signal and acks the job as cancelled once it
-- stops. Each row reports whether it was executing on no live producer. Rows
-- are locked in id order so two bulk cancels cannot deadlock. Completed,
-- discarded and cancelled jobs are left alone.
WITH locked AS (
    SELECT j.id,
           j.state,
           j.state = 'executing'
           AND j.attempted_at < timezone('UTC', now()) - make_interval(secs => $2)
           AND NOT EXISTS (
               SELECT 1
               FROM {prefix}.oban_producers p
               WHERE p.uuid::text = j.attempted_by[2]
                 AND p.updated_at > timezone('UTC', now()) - make_interval(secs => $2)
           ) AS orphaned
    FROM {prefix}.oban_jobs j
    WHERE j.id = ANY($1::bigint[])
      AND j.state IN ('executing', 'available', 'scheduled', 'retryable', 'suspended')
    ORDER BY j.id
    FOR UPDATE OF j
),
cancelled AS (
    UPDATE {prefix}.oban_jobs j
    SET state = 'cancelled',
        cancelled_at = timezone('UTC', now()),
        meta = j.meta || jsonb_build_object('cancel_attempted_at', timezone('UTC', now()))
    FROM locked
    WHERE j.id = locked.id
      AND (locked.state <> 'executing' OR locked.orphaned)
    RETURNING j.id
)
SELECT locked.id, locked.state::text, locked.orphaned
FROM locked
ORDER BY locked.id
