-- First attempts: POST with an Idempotency-Key that no other request of the run uses.
-- Unique across wrk threads and connections: <run prefix>-<thread id>-<counter>.
-- Usage: wrk ... -s bench/first.lua URL -- <run prefix> [path]

local threads, next_id = {}, 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local prefix, path, body, counter, id
local headers = {["Content-Type"] = "application/json"}

function init(args)
  prefix = args[1] or tostring(os.time())
  path = args[2] or "/pay/orders"
  body = '{"amount":100,"currency":"EUR","customer":"cus_bench"}'
  id = wrk.thread:get("id")
  counter = 0
end

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = prefix .. "-" .. id .. "-" .. counter
  return wrk.format("POST", path, headers, body)
end
