-- fingerprints.lua: compare a batch of query fingerprints with every client's
-- recent ones, then store them; the cross-client store of issue 3.
--
-- Called by gateway/fingerprints.py (RedisFingerprintStore.observe), one
-- EVALSHA per batch. Every key carries the hash tag {<prefix>:fp}, so the call
-- touches one Redis Cluster slot (see the module for what that costs).
--
-- KEYS[1]          sequence counter of stored entries
-- KEYS[2..]        one list per distinct hash value of the batch, newest
--                  first, at most ARGV[2] items "<ms>|<entry>|<client>";
--                  then one string key per distinct input key of the batch,
--                  present while that exact input was stored recently
--
-- ARGV[1] ttl ms   ARGV[2] entries kept per hash   ARGV[3] match threshold
-- ARGV[4] rows     then per row: client, remember ("1"/"0"), index into
--                  KEYS of its input key (0: none), hash count m, and m
--                  indexes into KEYS
--
-- Returns per row {own, identical, client1, n1, client2, n2, ...}: near
-- duplicates among the client's own entries, other clients' near duplicates
-- of an input stored before (an exact copy), and per other client its
-- near-duplicate entries.

if redis.replicate_commands then
  redis.replicate_commands()
end

local time = redis.call("TIME")
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl_ms = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local n_rows = tonumber(ARGV[4])
local oldest = now_ms - ttl_ms

local out = {}
local at = 5
for row = 1, n_rows do
  local client = ARGV[at]
  local remember = ARGV[at + 1] == "1"
  local input_index = tonumber(ARGV[at + 2])
  local m = tonumber(ARGV[at + 3])
  at = at + 4
  local exact = false
  if input_index > 0 then
    exact = redis.call("EXISTS", KEYS[input_index]) == 1
  end
  local keys = {}
  for i = 1, m do
    keys[i] = KEYS[tonumber(ARGV[at + i - 1])]
  end
  at = at + m

  local counts = {}
  for i = 1, m do
    local items = redis.call("LRANGE", keys[i], 0, cap - 1)
    for _, item in ipairs(items) do
      local bar = string.find(item, "|", 1, true)
      if tonumber(string.sub(item, 1, bar - 1)) >= oldest then
        local entry = string.sub(item, bar + 1)
        counts[entry] = (counts[entry] or 0) + 1
      end
    end
  end

  local own, identical = 0, 0
  local others = {}
  local order = {}
  for entry, shared in pairs(counts) do
    if shared >= threshold then
      local sender = string.sub(entry, string.find(entry, "|", 1, true) + 1)
      if sender == client then
        own = own + 1
      elseif exact then
        identical = identical + 1
      else
        if others[sender] == nil then
          others[sender] = 0
          order[#order + 1] = sender
        end
        others[sender] = others[sender] + 1
      end
    end
  end
  table.sort(order)
  local reply = {own, identical}
  for _, sender in ipairs(order) do
    reply[#reply + 1] = sender
    reply[#reply + 1] = others[sender]
  end
  out[row] = reply

  if remember and input_index > 0 then
    redis.call("SET", KEYS[input_index], "1", "PX", ttl_ms)
  end
  if remember and m > 0 then
    -- Lists rather than sorted sets: three cheap calls per hash; items older
    -- than the ttl are skipped when read and fall off the end when pushed.
    local item = now_ms .. "|" .. redis.call("INCR", KEYS[1]) .. "|" .. client
    for i = 1, m do
      local key = keys[i]
      redis.call("LPUSH", key, item)
      redis.call("LTRIM", key, 0, cap - 1)
      redis.call("PEXPIRE", key, ttl_ms)
    end
  end
end
return out
