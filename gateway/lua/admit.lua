-- admit.lua: admit one client's share of a batch, item by item, atomically.
--
-- Called by gateway/store.py (CounterStore.admit_batch), one EVALSHA per client
-- per batch, all in one pipeline. Every key below carries the client's hash tag
-- {c:<client_id>}, so one call touches one Redis Cluster slot.
--
-- KEYS[1] tat     GCRA theoretical arrival time, microseconds (string)
-- KEYS[2] block   present while the client is blocked; its PTTL is the rest
-- KEYS[3] totals  hash: requests (admitted), refused
-- KEYS[4] day     hash: d (UTC day number), requests, refused for that day
-- KEYS[4+i]       dedupe key of item i: its delivery ("partition:offset")
--
-- ARGV[1] replay window ms   ARGV[2] "1" if refused requests move the TAT
-- ARGV[3] totals ttl ms      ARGV[4] day ttl ms
-- then per item i, from ARGV[5 + 4*(i-1)]: delivery, rate_per_s, burst, cost
--
-- Returns per item {outcome, retry_after_ms, client_requests, tat_ahead_us}.

-- Effects replication is the default since Redis 5 (needed for TIME below);
-- the call keeps 3.2 and 4.x correct and is a no-op later.
if redis.replicate_commands then
  redis.replicate_commands()
end

local tat_key, block_key, totals_key, day_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local replay_ms = tonumber(ARGV[1])
local count_refused = ARGV[2] == "1"
local totals_ttl_ms = tonumber(ARGV[3])
local day_ttl_ms = tonumber(ARGV[4])

-- The server's clock, so that workers' clocks never matter. One reading per
-- call: items of one batch arrive "at the same instant".
local time = redis.call("TIME")
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local today = math.floor(tonumber(time[1]) / 86400)

-- A missing TAT means the client is fully rested, the same as TAT <= now.
local tat = tonumber(redis.call("GET", tat_key)) or now_us
local tat_moved = false
local block_pttl = redis.call("PTTL", block_key)
local requests = tonumber(redis.call("HGET", totals_key, "requests")) or 0
local admitted, refused = 0, 0
local results = {}

for i = 1, #KEYS - 4 do
  local req_key = KEYS[4 + i]
  local base = 4 + 4 * (i - 1)
  local delivery = ARGV[base + 1]
  local rate = tonumber(ARGV[base + 2])
  local burst = tonumber(ARGV[base + 3])
  local cost = tonumber(ARGV[base + 4])
  local outcome, retry_ms = "ok", 0

  -- 1. Dedupe. The key exists only for admitted requests: the same Kafka
  -- record again is a redelivery after a crash (answer again, count once);
  -- another record with this id is a duplicate. A refused request leaves no
  -- key, so the client may retry it under the same id.
  local seen = redis.call("GET", req_key)
  if seen then
    if seen == delivery then
      outcome = "redelivery"
    else
      outcome = "duplicate"
    end

  -- 2. Block. PTTL is -2 when the key is missing; -1 (no expiry) cannot
  -- happen through CounterStore.block but reads as "blocked, no estimate".
  elseif block_pttl ~= -2 then
    outcome = "blocked"
    retry_ms = math.max(block_pttl, 0)

  -- 3. GCRA (generic cell rate algorithm, ATM Forum TM 4.0; the form of
  -- brandur/redis-cell). Emission interval T = 1e6/rate us, tolerance
  -- tau = T*(burst-1). Allowed iff now >= max(TAT, now) + T*cost - T*burst,
  -- which for cost 1 is now >= TAT - tau; then TAT = max(TAT, now) + T*cost.
  else
    local interval = 1000000 / rate
    local new_tat = math.max(tat, now_us) + interval * cost
    local allow_at = new_tat - interval * burst
    if now_us < allow_at then
      outcome = "rate_limited"
      retry_ms = math.ceil((allow_at - now_us) / 1000)
      if count_refused then
        tat = new_tat
        tat_moved = true
      end
    else
      tat = new_tat
      tat_moved = true
    end
  end

  -- 4. Count. Redeliveries count as nothing: they were counted the first time.
  if outcome == "ok" then
    admitted = admitted + 1
    requests = requests + 1
    redis.call("SET", req_key, delivery, "PX", replay_ms)
  elseif outcome ~= "redelivery" then
    refused = refused + 1
  end
  -- The fourth number is how far the TAT runs ahead of now (us, >= 0): the
  -- store turns it into the remaining allowance and time until full.
  results[i] = {outcome, retry_ms, requests, math.floor(math.max(tat - now_us, 0))}
end

-- The TAT only matters until it passes; after that a missing key means the same.
if tat_moved and tat > now_us then
  local ttl_ms = math.ceil((tat - now_us) / 1000) + 1
  -- %.17g: tostring keeps 14 digits, i.e. 100 us steps at today's epoch.
  redis.call("SET", tat_key, string.format("%.17g", tat), "PX", ttl_ms)
end

if admitted + refused > 0 then
  redis.call("HINCRBY", totals_key, "requests", admitted)
  redis.call("HINCRBY", totals_key, "refused", refused)
  redis.call("PEXPIRE", totals_key, totals_ttl_ms)

  -- One hash per client holds only the current UTC day; a new day resets it.
  if tonumber(redis.call("HGET", day_key, "d")) ~= today then
    redis.call("DEL", day_key)
    redis.call("HSET", day_key, "d", today)
  end
  redis.call("HINCRBY", day_key, "requests", admitted)
  redis.call("HINCRBY", day_key, "refused", refused)
  redis.call("PEXPIRE", day_key, day_ttl_ms)
end

return results
