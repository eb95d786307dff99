-- admit.lua: admit one client's share of a batch, item by item, atomically.
--
-- Called by gateway/store.py (CounterStore.admit_batch), one EVALSHA per client
-- (and plan) per batch, all in one pipeline. Every key below carries the
-- client's hash tag {c:<client_id>}, so one call touches one Redis Cluster slot.
--
-- KEYS[1] block     present while the client is blocked; its PTTL is the rest
-- KEYS[2] totals    hash: requests (admitted), refused
-- KEYS[3] day       hash: d (UTC day number), requests, refused for that day
-- KEYS[4] inflight  sorted set: request -> time (us) its slot frees by itself
-- KEYS[5] hidden    present while a block or throttle is served hidden (value:
--                   "block" or "throttle"); only read, it refuses nothing
-- KEYS[6] released  present while a release waits for the owning worker
--                   (value: release time ms); only read, the worker deletes it
-- KEYS[6+r]         GCRA theoretical arrival time (us) of rule r, r = 1..R
-- KEYS[6+R+i]       dedupe key of item i: its delivery ("partition:offset")
--
-- ARGV[1] replay window ms   ARGV[2] "1" if refused requests move the TATs
-- ARGV[3] totals ttl ms      ARGV[4] day ttl ms
-- ARGV[5] now in us, or "" for the server's clock (tests pass their own)
-- ARGV[6] R, the number of GCRA rules
-- ARGV[7] daily quota (0: none)
-- ARGV[8] in-flight cap (0: none)   ARGV[9] in-flight slot lifetime ms
-- then per rule r, from ARGV[10 + 3*(r-1)]: limit, burst, window ms
-- then per item i, from ARGV[10 + 3*R + 4*(i-1)]: delivery, member, cost,
--   sent (when the broker appended the request, us; "" for "now")
--
-- Returns one string: first a line of the client's "hidden_ms hidden
-- released" (the hidden record's remaining ms and action, "-" when none; 1 if
-- a release marker waits), which ride on this call so that the worker learns
-- them without a round trip of its own; then a line per item: "outcome
-- retry_after_ms client_requests limit remaining reset_ms window_ms
-- in_flight". limit to window_ms describe the binding window (the one with
-- the fewest requests left), window_ms 0 if the plan has neither rules nor
-- quota; in_flight is 1 if the item holds a slot. One bulk string, not nested
-- arrays: redis-py's pure-Python parser pays per array element, and eight per
-- item cost more than the script itself.

-- Effects replication is the default since Redis 5 (needed for TIME below);
-- the call keeps 3.2 and 4.x correct and is a no-op later.
if redis.replicate_commands then
  redis.replicate_commands()
end

local block_key, totals_key, day_key, inflight_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local hidden_key, released_key = KEYS[5], KEYS[6]
local N_FIXED = 6
local replay_ms = tonumber(ARGV[1])
local count_refused = ARGV[2] == "1"
local totals_ttl_ms = tonumber(ARGV[3])
local day_ttl_ms = tonumber(ARGV[4])
local n_rules = tonumber(ARGV[6])
local quota = tonumber(ARGV[7])
local cap = tonumber(ARGV[8])
local inflight_ttl_us = tonumber(ARGV[9]) * 1000
local DAY_US = 86400 * 1000000

-- The server's clock, so that workers' clocks never matter. One reading per
-- call: items of one batch arrive "at the same instant".
local now_us
if ARGV[5] ~= "" then
  now_us = tonumber(ARGV[5])
else
  local time = redis.call("TIME")
  now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local today = math.floor(now_us / DAY_US)
local midnight_us = (today + 1) * DAY_US

-- Rules: emission interval T = window/limit, tolerance T*(burst-1). A TAT is
-- kept for the replay window after it passes (below), so a missing one means
-- the client was rested before any request this call may judge: 0.
local interval, burst, window_ms, tat, tat_moved = {}, {}, {}, {}, {}
for r = 1, n_rules do
  local base = 9 + 3 * (r - 1)
  window_ms[r] = tonumber(ARGV[base + 3])
  interval[r] = window_ms[r] * 1000 / tonumber(ARGV[base + 1])
  burst[r] = tonumber(ARGV[base + 2])
  tat[r] = tonumber(redis.call("GET", KEYS[N_FIXED + r])) or 0
  tat_moved[r] = false
end

local block_pttl = redis.call("PTTL", block_key)
-- The hidden record: what the worker's policy memory may have lost (a
-- snapshot refused or deleted) and must go on serving late and coarse.
local hidden_ms, hidden = 0, "-"
local hidden_pttl = redis.call("PTTL", hidden_key)
if hidden_pttl > 0 then
  local value = redis.call("GET", hidden_key)
  if value == "block" or value == "throttle" then
    hidden_ms, hidden = hidden_pttl, value
  end
end
local released = redis.call("EXISTS", released_key)
local requests = tonumber(redis.call("HGET", totals_key, "requests")) or 0
-- The day hash holds only one UTC day; another day's counts read as zero.
local day_requests = 0
if tonumber(redis.call("HGET", day_key, "d")) == today then
  day_requests = tonumber(redis.call("HGET", day_key, "requests")) or 0
end
-- Slots whose holder never released them (a crashed worker) free themselves.
local in_flight = 0
if cap > 0 then
  redis.call("ZREMRANGEBYSCORE", inflight_key, "-inf", now_us)
  in_flight = redis.call("ZCARD", inflight_key)
end
local inflight_added = false
local admitted, refused = 0, 0
local results = {}
local items_base = 9 + 3 * n_rules
-- How far back a request may be judged: a request older than the replay
-- window is refused by its signature's age before it gets here.
local oldest_us = now_us - replay_ms * 1000

-- The binding window after a decision: the rule (or quota) with the fewest
-- requests left; on a tie the one that takes longest to refill.
local function binding()
  local b_limit, b_remaining, b_reset, b_window = 0, -1, 0, 0
  for r = 1, n_rules do
    local ahead = math.max(tat[r] - now_us, 0)
    local remaining = math.max(math.floor(burst[r] - ahead / interval[r]), 0)
    local reset_ms = math.ceil(ahead / 1000)
    if b_remaining < 0 or remaining < b_remaining
        or (remaining == b_remaining and reset_ms > b_reset) then
      -- The window a client sees is the time one full burst takes to refill
      -- (burst x T): "q=burst;w=that" describes the GCRA honestly, also for a
      -- rule whose burst differs from its limit.
      b_limit, b_remaining, b_reset = burst[r], remaining, reset_ms
      b_window = math.ceil(burst[r] * interval[r] / 1000)
    end
  end
  if quota > 0 then
    local remaining = math.max(quota - day_requests, 0)
    local reset_ms = math.ceil((midnight_us - now_us) / 1000)
    if b_remaining < 0 or remaining < b_remaining
        or (remaining == b_remaining and reset_ms > b_reset) then
      b_limit, b_remaining, b_reset, b_window = quota, remaining, reset_ms, 86400000
    end
  end
  return b_limit, math.max(b_remaining, 0), b_reset, b_window
end

for i = 1, #KEYS - N_FIXED - n_rules do
  local req_key = KEYS[N_FIXED + n_rules + i]
  local base = items_base + 4 * (i - 1)
  local delivery = ARGV[base + 1]
  local member = ARGV[base + 2]
  local cost = tonumber(ARGV[base + 3])
  -- The instant the rate windows judge this request at: when the broker
  -- took it, so that a backlog built while no worker ran is judged as it
  -- was sent, not as one burst. Never later than now: the GCRA is monotone
  -- in the TAT, so an earlier instant can only refuse more for a given TAT.
  local at_us = now_us
  if ARGV[base + 4] ~= "" then
    at_us = math.max(math.min(tonumber(ARGV[base + 4]), now_us), oldest_us)
  end
  local outcome, retry_ms, holds_slot = "ok", 0, 0

  -- 1. Dedupe. The key exists only for admitted requests: the same Kafka
  -- record again is a redelivery after a crash (answer again, count once);
  -- another record with this id is a duplicate. A refused request leaves no
  -- key, so the client may retry it under the same id.
  local seen = redis.call("GET", req_key)
  if seen then
    if seen == delivery then
      outcome = "redelivery"
      -- It is served again, so it holds a slot again (the same one if the
      -- first holder has not released it), whatever the cap says.
      if cap > 0 then
        in_flight = in_flight + redis.call("ZADD", inflight_key, now_us + inflight_ttl_us, member)
        inflight_added = true
        holds_slot = 1
      end
    else
      outcome = "duplicate"
    end

  -- 2. Block. PTTL is -2 when the key is missing; -1 (no expiry) cannot
  -- happen through CounterStore.block but reads as "blocked, no estimate".
  elseif block_pttl ~= -2 then
    outcome = "blocked"
    retry_ms = math.max(block_pttl, 0)

  else
    -- 3. Limits, all judged before any is charged: the quota (its refusal
    -- lasts longest, so it is reported first), every GCRA window (GCRA,
    -- ATM Forum TM 4.0, in the form of brandur/redis-cell: allowed iff
    -- at >= max(TAT, at) + T*cost - T*burst; the longest wait binds, counted
    -- from now), then the in-flight cap.
    local new_tat, limited, wait_us = {}, false, 0
    for r = 1, n_rules do
      new_tat[r] = math.max(tat[r], at_us) + interval[r] * cost
      local allow_at = new_tat[r] - interval[r] * burst[r]
      if at_us < allow_at then
        limited = true
        wait_us = math.max(wait_us, allow_at - now_us)
      end
    end
    if quota > 0 and day_requests + 1 > quota then
      outcome = "quota_exceeded"
      retry_ms = math.ceil((midnight_us - now_us) / 1000)
    elseif limited then
      outcome = "rate_limited"
      -- A backlogged request refused at its own instant may be allowed by
      -- now: still a wait, the shortest there is.
      retry_ms = math.max(math.ceil(wait_us / 1000), 1)
    elseif cap > 0 and in_flight >= cap then
      outcome = "too_many_in_flight"
    end

    -- 4. Charge: an admitted request uses every window; a refused one too
    -- when count_refused is on (a client that keeps knocking stays out).
    if outcome == "ok" or count_refused then
      for r = 1, n_rules do
        tat[r] = new_tat[r]
        tat_moved[r] = true
      end
    end
    if outcome == "ok" and cap > 0 then
      redis.call("ZADD", inflight_key, now_us + inflight_ttl_us, member)
      in_flight = in_flight + 1
      inflight_added = true
      holds_slot = 1
    end
  end

  -- 5. Count. Redeliveries count as nothing: they were counted the first time.
  if outcome == "ok" then
    admitted = admitted + 1
    requests = requests + 1
    day_requests = day_requests + 1
    redis.call("SET", req_key, delivery, "PX", replay_ms)
  elseif outcome ~= "redelivery" then
    refused = refused + 1
  end
  local limit, remaining, reset_ms, window = binding()
  results[i] = string.format("%s %d %d %d %d %d %d %d", outcome, retry_ms, requests,
    limit, remaining, reset_ms, window, holds_slot)
end

-- A TAT matters until it passes, and for the replay window after that, while
-- a request sent before it passed may still be judged at its sending.
for r = 1, n_rules do
  if tat_moved[r] and tat[r] > oldest_us then
    local ttl_ms = math.ceil((tat[r] - oldest_us) / 1000) + 1
    -- %.17g: tostring keeps 14 digits, i.e. 100 us steps at today's epoch.
    redis.call("SET", KEYS[N_FIXED + r], string.format("%.17g", tat[r]), "PX", ttl_ms)
  end
end

if inflight_added then
  -- The set outlives its newest slot by nothing: with no holder left it goes.
  redis.call("PEXPIRE", inflight_key, math.ceil(inflight_ttl_us / 1000))
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

return string.format("%d %s %d\n", hidden_ms, hidden, released)
  .. table.concat(results, "\n")
