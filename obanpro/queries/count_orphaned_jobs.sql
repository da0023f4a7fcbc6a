-- Counts per node the executing jobs that no live producer runs, by the rule
-- cancel_jobs uses: attempted over $1 seconds ago, with a producer row missing
-- or older than that, as after a node was killed.
SELECT coalesce(j.attempted_by[1], '?') AS node, count(*)
FROM {prefix}.oban_jobs j
WHERE j.state = 'executing'
  AND j.attempted_at < timezone('UTC', now()) - make_interval(secs => $1)
  AND NOT EXISTS (
      SELECT 1
      FROM {prefix}.oban_producers p
      WHERE p.uuid::text = j.attempted_by[2]
        AND p.updated_at > timezone('UTC', now()) - make_interval(secs => $1)
  )
GROUP BY 1
ORDER BY 1
