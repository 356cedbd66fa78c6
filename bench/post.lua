-- wrk script: POST a unique, realistic order event on every request.
--
--   wrk -t1 -c64 -d10s -s bench/post.lua http://127.0.0.1:PORT/webhook/order -- \
--       TEMPLATES_FILE BEARER_TOKEN PREFIX [IDS]
--
-- TEMPLATES_FILE holds one JSON body per line (bench/bodies.py writes it) with the
-- placeholders @@ORDER@@, @@STAMP@@ and @@MSG@@. Each request fills them from a per-thread
-- counter and the thread number, so every body is a new order (distinct orderId) with its
-- own lastUpdatedAt and messageId: nothing the daemon sees is a duplicate. PREFIX is
-- random per run, so runs never collide either. IDS "random" begins each order id with 8
-- scattered hex digits instead of PREFIX, so the ids land anywhere in the store's indexes
-- as Tradecloud's UUIDs do (bench/bodies.py order_id makes the same ids). done() prints
-- one line of JSON after "BENCH_JSON " for bench/load.py to read (latencies in
-- microseconds).

local threads = {}
local counter = 0
local templates = {}
local placeholders = { "@@ORDER@@", "@@STAMP@@", "@@MSG@@" }

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

-- Split a template into literal pieces and the placeholder index that follows each piece.
local function compile(text)
  local pieces, slots, pos = {}, {}, 1
  while true do
    local best, best_slot = nil, nil
    for slot, ph in ipairs(placeholders) do
      local at = string.find(text, ph, pos, true)
      if at and (best == nil or at < best) then best, best_slot = at, slot end
    end
    if best == nil then
      table.insert(pieces, string.sub(text, pos))
      return { pieces = pieces, slots = slots }
    end
    table.insert(pieces, string.sub(text, pos, best - 1))
    table.insert(slots, best_slot)
    pos = best + #placeholders[best_slot]
  end
end

function init(args)
  local path, token = args[1], args[2]
  prefix = args[3] or "bench000"
  random_ids = args[4] == "random"
  prefix_hash = 0
  for i = 1, #prefix do
    prefix_hash = (prefix_hash * 31 + string.byte(prefix, i)) % 4294967296
  end
  for line in io.lines(path) do
    if #line > 0 then table.insert(templates, compile(line)) end
  end
  assert(#templates > 0, "no templates in " .. path)
  headers = { ["Content-Type"] = "application/json" }
  if token and #token > 0 then headers["Authorization"] = "Bearer " .. token end
  base_ms = (os.time() - 86400) * 1000
  tid = tid or 1
end

function request()
  counter = counter + 1
  local stamp_ms = base_ms + counter * 16 + (tid % 16)
  local secs = math.floor(stamp_ms / 1000)
  local head = prefix
  if random_ids then
    head = string.format("%08x", (counter * 2654435761 + tid * 40503 + prefix_hash) % 4294967296)
  end
  local values = {
    string.format("%s-%04x-4000-8000-%012d", head, tid, counter),
    os.date("!%Y-%m-%dT%H:%M:%S", secs) .. string.format(".%03dZ", stamp_ms % 1000),
    string.format("%s-%04x-4000-9000-%012d", prefix, tid, counter),
  }
  local t = templates[(counter % #templates) + 1]
  local out = {}
  for i, piece in ipairs(t.pieces) do
    out[#out + 1] = piece
    local slot = t.slots[i]
    if slot then out[#out + 1] = values[slot] end
  end
  return wrk.format("POST", nil, headers, table.concat(out))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
