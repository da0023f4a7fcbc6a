-- The highest id among the available jobs of one queue, where a single drain pass stops.
SELECT max(id)
FROM {prefix}.oban_jobs
WHERE state = 'available'
  AND queue = $1
