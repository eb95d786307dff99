-- throttle.lua: the policy's penalty bucket for one throttled client.
--
-- Called by gateway/throttle.py (ThrottleStore.check) only for clients the
-- policy has throttled, after the ordinary admission (admit.lua) passed them.
-- A GCRA like admit.lua's, on a key of its own, so that the limits a plan sets
-- and the penalty policy adds never have to share one script.
--
-- KEYS[1] penalty TAT, microseconds (string); carries the client's hash tag
-- ARGV[1] penalised rate per second   ARGV[2] penalised burst
-- ARGV[3] number of requests to decide, in order
--
-- Returns per request its retry-after in ms: 0 = passes, > 0 = refused.

if redis.replicate_commands then
  redis.replicate_commands()
end

local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local time = redis.call("TIME")
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call("GET", KEYS[1])) or now_us
local interval = 1000000 / rate
local results = {}

for i = 1, n do
  local new_tat = math.max(tat, now_us) + interval
  local allow_at = new_tat - interval * burst
  if now_us < allow_at then
    results[i] = math.ceil((allow_at - now_us) / 1000)
  else
    tat = new_tat
    results[i] = 0
  end
end

if tat > now_us then
  local ttl_ms = math.ceil((tat - now_us) / 1000) + 1
  redis.call("SET", KEYS[1], string.format("%.17g", tat), "PX", ttl_ms)
end
return results
