-- wrk script for the benchmark harness: POST bodies read from a file to one route, one JSON line on exit.
--   wrk -t1 -c64 -d10s --latency -s loadtest/wrk/classify.lua http://127.0.0.1:8000 -- bodies.tsv /classify
-- bodies.tsv (loadtest/data.py write_bodies): "<sentences>\t<JSON header length>\t<body in hex>" per line; a header
-- length above 0 marks an Open Inference Protocol body with binary tensors (Inference-Header-Content-Length).
-- The line starting "WRK_JSON " is what loadtest/generators.py reads; sentences/s = requests x sent_sentences / sent.

local requests_ = {}
local counts = {}
-- Each UNIQUE in a body (the distinct workload, loadtest/data.py) becomes a number no request of any run sent before:
-- such a request is formatted as it goes (a counter from the clock, so runs never meet).
local UNIQUE = "@@UNIQUE@@"
local parts = {}
local path_ = "/classify"
local counter = 0
local threads = {}
local position = 0
sent, sent_sentences = 0, 0

function setup(thread)
  thread:set("offset", #threads * 7919)
  table.insert(threads, thread)
end

local function unhex(text)
  return (text:gsub("..", function(pair) return string.char(tonumber(pair, 16)) end))
end

function init(args)
  local path = args[2] or "/classify"
  path_ = path
  counter = os.time() * 100000 + (offset or 0)
  for line in io.lines(args[1]) do
    local count, header, body = line:match("^(%d+)\t(%d+)\t(%x+)$")
    if body then
      local headers = {["Content-Type"] = "application/json"}
      if tonumber(header) > 0 then
        headers = {["Content-Type"] = "application/octet-stream", ["Inference-Header-Content-Length"] = header}
      end
      local text = unhex(body)
      if text:find(UNIQUE, 1, true) then
        table.insert(parts, {text, headers})
      else
        table.insert(parts, false)
      end
      table.insert(requests_, wrk.format("POST", path, headers, text))
      table.insert(counts, tonumber(count))
    end
  end
  if #requests_ == 0 then
    error("no request bodies in " .. tostring(args[1]))
  end
  position = (offset or 0) % #requests_
end

function request()
  position = position % #requests_ + 1
  sent = sent + 1
  sent_sentences = sent_sentences + counts[position]
  local unique = parts[position]
  if unique then
    local body = unique[1]:gsub(UNIQUE, function()
      counter = counter + 1
      return string.format("%x", counter)
    end)
    return wrk.format("POST", path_, unique[2], body)
  end
  return requests_[position]
end

function done(summary, latency, requests)
  local total_sent, total_sentences = 0, 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    total_sentences = total_sentences + thread:get("sent_sentences")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_s":%.6f,"requests":%d,"sent":%d,"sent_sentences":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f}\n',
    summary.duration / 1e6, summary.requests, total_sent, total_sentences,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
