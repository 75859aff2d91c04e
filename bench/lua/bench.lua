-- wrk script for bench/run.py. Arguments after "--": MODE and its operands.
--   post-list PATH FILE         POST the "signature<TAB>body" lines of FILE in order (Stripe-Signature)
--   get-list FILE TOKEN         GET the paths of FILE round robin, with a bearer token ("-" for none)
--   debit PATH TOKEN PREFIX AMOUNT   POST ledger-entry debits with distinct idempotency keys
-- done() prints one line "BENCHJSON {...}" that bench/run.py reads: counts by status class, how many
-- requests were sent and how often the list wrapped (a wrapped list re-sends events: duplicates).

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("tid", #threads)
end

local mode, items, sigs, path, token, prefix, amount
sent, wraps, s2xx, s400, s4xx, s5xx, sother = 0, 0, 0, 0, 0, 0, 0
local idx = 0

local function lines(file)
   local out = {}
   local f = assert(io.open(file, "r"))
   for line in f:lines() do out[#out + 1] = line end
   f:close()
   return out
end

function init(args)
   mode = args[1]
   if mode == "post-list" then
      path = args[2]
      items, sigs = {}, {}
      for _, line in ipairs(lines(args[3])) do
         local tab = line:find("\t", 1, true)
         sigs[#sigs + 1] = line:sub(1, tab - 1)
         items[#items + 1] = line:sub(tab + 1)
      end
   elseif mode == "get-list" then
      items = lines(args[2])
      token = args[3]
   elseif mode == "debit" then
      path, token, prefix, amount = args[2], args[3], args[4], args[5]
   else
      error("unknown mode " .. tostring(mode))
   end
end

function request()
   sent = sent + 1
   if mode == "post-list" then
      idx = idx + 1
      if idx > #items then idx = 1; wraps = wraps + 1 end
      return wrk.format("POST", path, {["Content-Type"] = "application/json", ["Stripe-Signature"] = sigs[idx]},
                        items[idx])
   elseif mode == "get-list" then
      idx = idx + 1
      if idx > #items then idx = 1 end
      local headers = {}
      if token ~= "-" then headers["Authorization"] = "Bearer " .. token end
      return wrk.format("GET", items[idx], headers)
   else
      local body = '{"entry_type":"debit","amount":"' .. amount .. '","idempotency_key":"' .. prefix .. "-" ..
                   wrk.thread:get("tid") .. "-" .. sent .. '","reason":"bench"}'
      return wrk.format("POST", path, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token},
                        body)
   end
end

function response(status, headers, body)
   if status >= 200 and status < 300 then s2xx = s2xx + 1
   elseif status == 400 then s400 = s400 + 1
   elseif status >= 400 and status < 500 then s4xx = s4xx + 1
   elseif status >= 500 then s5xx = s5xx + 1
   else sother = sother + 1 end
end

function done(summary, latency, requests)
   local t = {sent = 0, wraps = 0, s2xx = 0, s400 = 0, s4xx = 0, s5xx = 0, sother = 0}
   for _, thread in ipairs(threads) do
      for name, _ in pairs(t) do t[name] = t[name] + (thread:get(name) or 0) end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"sent":%d,"wraps":%d,"s2xx":%d,"s400":%d,' ..
      '"s4xx":%d,"s5xx":%d,"sother":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
      '"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, t.sent, t.wraps, t.s2xx, t.s400, t.s4xx, t.s5xx,
      t.sother, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
