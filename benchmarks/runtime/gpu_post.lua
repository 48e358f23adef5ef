-- wrk script for bench_gpu.py: POST one fixed body, read from a file, with fixed headers.
-- Arguments after `--`: the body file, then one "Name: value" argument per header.
-- The body may be binary (the binary tensor data extension); Lua strings hold any bytes.
function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  for i = 2, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end
