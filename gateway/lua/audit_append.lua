-- Append one admin audit entry to its stream, chained to the newest entry
-- (gateway/admin/audit.py, audit_chain.py).
--
-- The caller computed the entry's hash and MAC over the chain head it
-- believed current (ARGV[1], ARGV[2]); the entry is added only if that head
-- is still the newest entry's, so that two admin replicas appending at once
-- cannot both link to one predecessor. Otherwise nothing is written and the
-- real head is returned, for the caller to sign again against it.
--
-- KEYS[1]  the audit stream
-- ARGV[1]  expected head: hash of the newest entry ("" if none is chained)
-- ARGV[2]  expected head's seq ("0" if none)
-- ARGV[3]  MAXLEN (approximate trim)
-- ARGV[4..] field, value, field, value, ...
-- Returns {1, id} when added, {0, head_hash, head_seq} when the head moved.

-- XADD with an id of '*' is not deterministic: replicate the effects.
if redis.replicate_commands then
  redis.replicate_commands()
end

local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local head, seq = '', '0'
if #newest > 0 then
  local fields = newest[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'hash' then
      head = fields[i + 1]
    elseif fields[i] == 'seq' then
      seq = fields[i + 1]
    end
  end
end
if head ~= ARGV[1] or seq ~= ARGV[2] then
  return {0, head, seq}
end

local command = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*'}
for i = 4, #ARGV do
  command[#command + 1] = ARGV[i]
end
return {1, redis.call(unpack(command))}
