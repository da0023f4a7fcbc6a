-- Deletes producer rows not heartbeated for more than $1 seconds, whichever
-- node wrote them.
DELETE FROM {prefix}.oban_producers
WHERE updated_at < timezone('UTC', now()) - make_interval(secs => $1)
