-- A 10 % retry mix: nine requests in ten are first attempts with a fresh key; every tenth
-- repeats the key this thread used RECENT requests earlier (a client retrying), which by
-- then has almost always completed, so the proxy replays it.
-- Unique keys: <run prefix>-<thread id>-<counter>, as in first.lua.
-- Usage: wrk ... -s bench/mix.lua URL -- <run prefix> [path]

local threads, next_id = {}, 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local RECENT = 500  -- far more than the requests one thread keeps in flight
local prefix, path, body, counter, id, sent
local headers = {["Content-Type"] = "application/json"}

function init(args)
  prefix = args[1] or tostring(os.time())
  path = args[2] or "/pay/orders"
  body = '{"amount":100,"currency":"EUR","customer":"cus_bench"}'
  id = wrk.thread:get("id")
  counter, sent = 0, 0
end

function request()
  sent = sent + 1
  local n
  if sent % 10 == 0 and counter > RECENT then
    n = counter - RECENT            -- a retry of an earlier request
  else
    counter = counter + 1           -- a first attempt
    n = counter
  end
  headers["Idempotency-Key"] = prefix .. "-" .. id .. "-" .. n
  return wrk.format("POST", path, headers, body)
end
