-- wrk script: POST /v1/verify with a key picked at random from $KEYS_FILE (the first $KEYS_USED lines),
-- authenticated with $SERVICE_KEY.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local bench_keys = require("bench_keys")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("SERVICE_KEY") or "")
request = function()
  return wrk.format(nil, "/v1/verify", nil, '{"key":"' .. bench_keys.random() .. '"}')
end
