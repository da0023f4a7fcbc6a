-- Empties the Oban tables of one prefix between tests and restarts job ids at 1.
TRUNCATE {prefix}.oban_jobs, {prefix}.oban_leaders, {prefix}.oban_producers RESTART IDENTITY CASCADE
