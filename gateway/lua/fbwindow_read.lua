-- fbwindow_read.lua: read the poisoning guard's shared class windows of one
-- model (gateway/feedback_windows.py, SharedWindows.load).
--
-- KEYS[1..n]   one list per class window, oldest entry first; every key of a
--              model carries the hash tag {<prefix>:fbwin:<model>}, so the call
--              touches one Redis Cluster slot
-- ARGV[1]      entries kept per window
-- ARGV[2]      largest entry in bytes
--
-- Returns per key {state, entry, ...}: state 0 = a list (or no key), 1 =
-- another type at the key (no entries), 2 = a list longer than a window
-- (written by something else; its last entries follow). An entry over the size
-- limit comes back as "": the caller refuses it without the bytes crossing the
-- network.

local keep = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call("TYPE", key)["ok"]
  if kind == "none" then
    out[i] = {0}
  elseif kind ~= "list" then
    out[i] = {1}
  else
    local reply = {0}
    if redis.call("LLEN", key) > keep then
      reply[1] = 2
    end
    local entries = redis.call("LRANGE", key, -keep, -1)
    for j, value in ipairs(entries) do
      if string.len(value) > limit then
        reply[j + 1] = ""
      else
        reply[j + 1] = value
      end
    end
    out[i] = reply
  end
end
return out
