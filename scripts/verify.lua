-- wrk script: POST /v1/verify with a key picked at random from $KEYS_FILE (the first $KEYS_USED lines),
-- authenticated with $SERVICE_KEY.
local keys = {}
local limit = tonumber(os.getenv("KEYS_USED") or "0")
for line in io.lines(os.getenv("KEYS_FILE")) do
  keys[#keys + 1] = line
  if limit > 0 and #keys >= limit then break end
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("SERVICE_KEY") or "")
math.randomseed(os.time())
request = function()
  return wrk.format(nil, "/v1/verify", nil, '{"key":"' .. keys[math.random(#keys)] .. '"}')
end
