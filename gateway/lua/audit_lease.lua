-- Take or renew the admin audit forwarder's lease (gateway/admin/audit_forward.py):
-- one admin replica at a time re-sends the audit entries that missed Kafka.
--
-- KEYS[1]  the lease (a string: the holder's id)
-- ARGV[1]  this replica's id      ARGV[2]  lease length, ms
-- Returns 1 if this replica holds the lease now, 0 if another does.

local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
