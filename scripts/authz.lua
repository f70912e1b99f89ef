-- wrk script: a forward-auth decision, as Caddy or Traefik asks it (GET /v1/authz?style=forwarded with
-- the client's key and the original method and URI), for a key picked at random from $KEYS_FILE (the
-- first $KEYS_USED lines).
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local bench_keys = require("bench_keys")
wrk.method = "GET"
wrk.headers["X-Forwarded-Method"] = "GET"
wrk.headers["X-Forwarded-Uri"] = "/v1/projects/7?page=2"
wrk.headers["X-Forwarded-Host"] = "api.example.com"
request = function()
  wrk.headers["Authorization"] = "Bearer " .. bench_keys.random()
  return wrk.format(nil, "/v1/authz?style=forwarded")
end
