-- Move the admin audit forwarder's cursor (gateway/admin/audit_forward.py),
-- only while the caller still holds the lease: a replica that lost it while
-- paused must not move the cursor the new holder owns.
--
-- KEYS[1]  the lease   KEYS[2]  the cursor (a stream id)
-- KEYS[3]  the sorted set of acknowledged stream ids (score: the id's ms)
-- KEYS[4]  the cursor's seq: every entry up to it is on the topic or was
--          counted lost
-- ARGV[1]  this replica's id   ARGV[2]  the new cursor   ARGV[3]  its ms part
-- ARGV[4]  the new cursor's seq
-- ARGV[5..] ids now behind the cursor, to forget
-- Returns 1 if moved, 0 if the lease is another's.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[4], ARGV[4])
for i = 5, #ARGV do
  redis.call('ZREM', KEYS[3], ARGV[i])
end
-- Marks older than the cursor's millisecond are behind it whatever their
-- sequence: a mark written after the forwarder re-sent its entry would
-- otherwise stay for ever.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[3])
return 1
