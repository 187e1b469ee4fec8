-- wrk script for the benchmark harness: POST /classify with bodies read from a file, one JSON line on exit.
--   wrk -t1 -c64 -d10s --latency -s loadtest/wrk/classify.lua http://127.0.0.1:8000 -- bodies.tsv
-- bodies.tsv: one request per line, "<number of sentences>\t<JSON body>"; each thread cycles through them.
-- The line starting "WRK_JSON " is what loadtest/bench.py reads; sentences/s = requests x sent_sentences / sent.

local bodies, counts = {}, {}
local threads = {}
local position = 0
sent, sent_sentences = 0, 0

function setup(thread)
  thread:set("offset", #threads * 7919)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    local count, body = line:match("^(%d+)\t(.+)$")
    if body then
      table.insert(bodies, body)
      table.insert(counts, tonumber(count))
    end
  end
  if #bodies == 0 then
    error("no request bodies in " .. tostring(args[1]))
  end
  position = (offset or 0) % #bodies
  wrk.method = "POST"
  wrk.path = "/classify"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  position = position % #bodies + 1
  sent = sent + 1
  sent_sentences = sent_sentences + counts[position]
  return wrk.format(nil, nil, nil, bodies[position])
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
