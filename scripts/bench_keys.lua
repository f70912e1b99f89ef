-- wrk module: the first $KEYS_USED lines (all when unset or 0) of $KEYS_FILE, as a list, and a
-- random pick among them. A wrk script finds it by putting its own directory on `package.path`.
local keys = {}
local limit = tonumber(os.getenv("KEYS_USED") or "0")
for line in io.lines(os.getenv("KEYS_FILE")) do
  keys[#keys + 1] = line
  if limit > 0 and #keys >= limit then break end
end
math.randomseed(os.time())
return {
  keys = keys,
  random = function() return keys[math.random(#keys)] end,
}
