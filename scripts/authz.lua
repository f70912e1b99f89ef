-- wrk script: a forward-auth decision, as Caddy or Traefik asks it (GET /v1/authz?style=forwarded with
-- the client's key and the original method and URI), for a key picked at random from $KEYS_FILE (the
-- first $KEYS_USED lines).
local keys = {}
local limit = tonumber(os.getenv("KEYS_USED") or "0")
for line in io.lines(os.getenv("KEYS_FILE")) do
  keys[#keys + 1] = line
  if limit > 0 and #keys >= limit then break end
end
wrk.method = "GET"
wrk.headers["X-Forwarded-Method"] = "GET"
wrk.headers["X-Forwarded-Uri"] = "/v1/projects/7?page=2"
wrk.headers["X-Forwarded-Host"] = "api.example.com"
math.randomseed(os.time())
request = function()
  wrk.headers["Authorization"] = "Bearer " .. keys[math.random(#keys)]
  return wrk.format(nil, "/v1/authz?style=forwarded")
end
