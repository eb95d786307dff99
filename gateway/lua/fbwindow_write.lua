-- fbwindow_write.lua: apply one batch's verdicts to the poisoning guard's
-- shared class windows of one model, atomically (gateway/feedback_windows.py,
-- SharedWindows.save).
--
-- KEYS[1..n]   one list per class window (hash tag {<prefix>:fbwin:<model>})
-- ARGV[1]      entries kept per window
-- ARGV[2]      expiry in ms, renewed on every write
-- then per key, in KEYS order:
--   rebuild    "1": drop whatever the key holds first (another type, or
--              entries the caller refused), "0": keep it
--   n_drop     then n_drop entries, byte for byte: the entries the batch's
--              rejected deliveries would have written (an earlier attempt's)
--   n_add      then n_add entries, oldest first: records the batch accepted
--
-- An entry starts with its record's 12-character digest (id, label and row).
-- An entry whose digest the window already holds is not added again: a batch
-- judged twice (redelivered, or retried after a failure) adds each accepted
-- row once. A dropped entry leaves the window: the latest verdict on a
-- delivery is the one the window reflects. Drops match whole entries, which
-- name the delivery (partition and offset), so a refused replay of a record
-- does not remove the entry its accepted first delivery wrote.
--
-- Returns the number of entries added.

local keep = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local a = 3
local added = 0
for _, key in ipairs(KEYS) do
  local rebuild = ARGV[a]
  local n_drop = tonumber(ARGV[a + 1])
  a = a + 2
  local kind = redis.call("TYPE", key)["ok"]
  if rebuild == "1" or (kind ~= "none" and kind ~= "list") then
    redis.call("DEL", key)
  end
  local drop = {}
  for _ = 1, n_drop do
    drop[ARGV[a]] = true
    a = a + 1
  end

  -- The digests the window holds; rejected deliveries' entries leave it.
  local present = {}
  for _, value in ipairs(redis.call("LRANGE", key, -keep, -1)) do
    if drop[value] then
      redis.call("LREM", key, 0, value)
    else
      present[string.sub(value, 1, 12)] = true
    end
  end

  local n_add = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n_add do
    local value = ARGV[a]
    a = a + 1
    local digest = string.sub(value, 1, 12)
    if not present[digest] and not drop[value] then
      redis.call("RPUSH", key, value)
      present[digest] = true
      added = added + 1
    end
  end

  redis.call("LTRIM", key, -keep, -1)
  if redis.call("EXISTS", key) == 1 then
    redis.call("PEXPIRE", key, ttl_ms)
  end
end
return added
