-- Replays: every request repeats one of N keys that the harness already sent once each,
-- with the same method, path and body (so the fingerprint matches), so the proxy answers
-- from the store and never calls the upstream.
-- Usage: wrk ... -s bench/replay.lua URL -- <key prefix> <N> [path]
-- The harness sends "<key prefix>-<i>" for i in 1..N first (bench/harness.py: prefill).

local threads, next_id = {}, 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local prefix, count, path, body, i
local headers = {["Content-Type"] = "application/json"}

function init(args)
  prefix = args[1]
  count = tonumber(args[2] or "1000")
  path = args[3] or "/pay/orders"
  body = '{"amount":100,"currency":"EUR","customer":"cus_bench"}'
  -- Threads start at different offsets and walk the set: every key is hit evenly.
  i = (wrk.thread:get("id") * 7919) % count
end

function request()
  i = i % count + 1
  headers["Idempotency-Key"] = prefix .. "-" .. i
  return wrk.format("POST", path, headers, body)
end
