-- Deletes at most $2 completed, cancelled and discarded jobs that finished
-- more than $1 seconds ago, oldest first within each state. Each state is read
-- through its partial index on the finish time. SKIP LOCKED leaves rows that
-- another transaction holds, such as another node's pruner or a retry, so a
-- prune never waits on a row lock and two pruners cannot deadlock. The lock
-- also rechecks the state, so a job retried meanwhile is left alone.
WITH completed AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state = 'completed'
      AND completed_at < timezone('UTC', now()) - make_interval(secs => $1)
    ORDER BY completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
cancelled AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state = 'cancelled'
      AND cancelled_at < timezone('UTC', now()) - make_interval(secs => $1)
    ORDER BY cancelled_at
    LIMIT greatest(0, $2 - (SELECT count(*) FROM completed))
    FOR UPDATE SKIP LOCKED
),
discarded AS (
    SELECT id
    FROM {prefix}.oban_jobs
    WHERE state = 'discarded'
      AND discarded_at < timezone('UTC', now()) - make_interval(secs => $1)
    ORDER BY discarded_at
    LIMIT greatest(0, $2 - (SELECT count(*) FROM completed) - (SELECT count(*) FROM cancelled))
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {prefix}.oban_jobs j
WHERE j.id = ANY(ARRAY(
    SELECT id FROM completed
    UNION ALL
    SELECT id FROM cancelled
    UNION ALL
    SELECT id FROM discarded
))
