-- Deletes the producer rows with the given uuids.
DELETE FROM {prefix}.oban_producers
WHERE uuid = ANY($1::uuid[])
