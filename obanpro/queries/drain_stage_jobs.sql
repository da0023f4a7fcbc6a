-- Makes every scheduled and retryable job of one queue available, whatever
-- its scheduled_at, for draining a queue in tests.
UPDATE {prefix}.oban_jobs
SET state = 'available'
WHERE queue = $1
  AND state IN ('scheduled', 'retryable')
RETURNING id
