-- regions.lua: for each counted row of a batch, the other clients that sent a
-- counted row into the same coarse region recently, then store the row; the
-- region half of issue 3's key links.
--
-- Called by gateway/regions.py (RedisRegionStore.observe), one EVALSHA per
-- batch. Every key carries the hash tag {<prefix>:rg}, so the call touches
-- one Redis Cluster slot.
--
-- KEYS[1..]        one list per distinct region of the batch, newest first,
--                  at most ARGV[2] items "<ms>|<client>"
--
-- ARGV[1] ttl ms   ARGV[2] entries kept per region   ARGV[3] rows
--                  then per row: client, index into KEYS of its region
--
-- Returns per row the other clients (each once) with an item in its region
-- younger than ttl ms, read before the row itself is stored.

if redis.replicate_commands then
  redis.replicate_commands()
end

local time = redis.call("TIME")
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl_ms = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local n_rows = tonumber(ARGV[3])
local oldest = now_ms - ttl_ms

local out = {}
local touched = {}
local at = 4
for row = 1, n_rows do
  local client = ARGV[at]
  local key = KEYS[tonumber(ARGV[at + 1])]
  at = at + 2
  local seen = {}
  local others = {}
  for _, item in ipairs(redis.call("LRANGE", key, 0, cap - 1)) do
    local bar = string.find(item, "|", 1, true)
    if bar and tonumber(string.sub(item, 1, bar - 1)) >= oldest then
      local sender = string.sub(item, bar + 1)
      if sender ~= client and not seen[sender] then
        seen[sender] = true
        others[#others + 1] = sender
      end
    end
  end
  out[row] = others
  redis.call("LPUSH", key, now_ms .. "|" .. client)
  redis.call("LTRIM", key, 0, cap - 1)
  touched[key] = true
end
for key, _ in pairs(touched) do
  redis.call("PEXPIRE", key, ttl_ms)
end
return out
