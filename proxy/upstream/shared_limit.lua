-- The one script of proxy/upstream/shared_limit.py: a whole rate-limit decision, atomic, on Redis' clock.
--
-- KEYS[1]: the cool-down; then per limit: sliding: its sorted set, its sum, its caps; fixed: its hash, its caps.
-- ARGV[1]: the mode.
--   take: the number of limits; per limit: kind ('s'|'f'), requests, span (µs: per + margin if sliding, per if
--         fixed); then per take (one or more, decided in order): weight, nonce
--   cool: µs from now
--   observe (one limit): nonce, kind, requests, span, used (-1: not said), cap's weight left (-1: none), cap's µs
-- Every mode answers Redis' time (µs) first; a take then, per take, reason (0 granted, 1 rate_limited,
-- 2 upstream_cooldown) and wait (µs), then per limit the weight it has room for after the takes.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local MAX_CAPS = 8

-- Lua's tostring keeps 14 digits: times in µs need 16
local function fmt(x) return string.format('%.0f', x) end
local function weight_of(member) return tonumber(string.match(member, '(%d+)$')) end

-- A sliding limit's weight still in its window (a send counts while now < its time + span).
local function sliding_sum(z, s, span)
  local cutoff = fmt(now - span)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  local sum = tonumber(redis.call('GET', s) or '0')
  if #gone > 0 then
    for _, m in ipairs(gone) do sum = sum - weight_of(m) end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
  end
  -- A sum that outlived its set (evicted, deleted) only refuses more, until it expires with the set's span.
  if sum < 0 then sum = 0 end
  if #gone > 0 then redis.call('SET', s, sum, 'KEEPTTL') end
  return sum
end

-- µs until `need` weight has left a sliding window: the oldest members, each worth >= 1, until enough.
local function sliding_wait(z, need, span)
  local oldest = redis.call('ZRANGE', z, 0, need - 1, 'WITHSCORES')
  local freed = 0
  for j = 1, #oldest, 2 do
    freed = freed + weight_of(oldest[j])
    if freed >= need then return tonumber(oldest[j + 1]) + span - now end
  end
  return span
end

local function sliding_add(z, s, member, weight, span)
  local ttl = math.ceil(span / 1000) + 1
  redis.call('ZADD', z, now, member)
  redis.call('INCRBY', s, weight)
  redis.call('PEXPIRE', z, ttl)
  redis.call('PEXPIRE', s, ttl)
end

-- A fixed limit's calendar window (aligned to the epoch) and its weight so far.
local function fixed_count(h, span)
  local window = math.floor(now / span)
  local seen = redis.call('HMGET', h, 'w', 'n')
  if seen[1] == fmt(window) then return window, tonumber(seen[2]) end
  return window, 0
end

local function fixed_set(h, window, count, span)
  redis.call('HSET', h, 'w', fmt(window), 'n', count)
  redis.call('PEXPIRE', h, math.ceil(((window + 1) * span - now) / 1000) + 1000)
end

-- Caps (from an upstream's remaining + reset): a hash {end µs: weight left until then}. The live ones, sorted.
local function live_caps(c)
  local flat = redis.call('HGETALL', c)
  local caps = {}
  for j = 1, #flat, 2 do
    local ends = tonumber(flat[j])
    if ends <= now then redis.call('HDEL', c, flat[j]) else caps[#caps + 1] = {ends, tonumber(flat[j + 1]), flat[j]} end
  end
  table.sort(caps, function(a, b) return a[1] < b[1] end)
  return caps
end

-- At most `left` more until `ends`, beside every cap already known (each is something the upstream said).
local function add_cap(c, left, ends)
  local caps = live_caps(c)
  for _, cap in ipairs(caps) do
    if cap[1] >= ends and cap[2] <= left then return end
  end
  local kept = {}
  for _, cap in ipairs(caps) do
    if cap[1] <= ends and cap[2] >= left then redis.call('HDEL', c, cap[3]) else kept[#kept + 1] = cap end
  end
  redis.call('HSET', c, fmt(ends), left)
  kept[#kept + 1] = {ends, left, fmt(ends)}
  table.sort(kept, function(a, b) return a[1] < b[1] end)
  if #kept > MAX_CAPS then
    -- the two soonest merged into one stricter than both: the smaller left, the later end
    redis.call('HDEL', c, kept[1][3])
    redis.call('HSET', c, kept[2][3], math.min(kept[1][2], kept[2][2]))
  end
  redis.call('PEXPIRE', c, math.ceil((kept[#kept][1] - now) / 1000) + 1)
end

if mode == 'cool' then
  local ends = now + tonumber(ARGV[2])
  local current = tonumber(redis.call('GET', KEYS[1]) or '0')
  if ends > current then
    redis.call('SET', KEYS[1], fmt(ends), 'PX', math.ceil((ends - now) / 1000))
  end
  return {now}
end

if mode == 'observe' then
  local kind, limit, span = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local used, cap_left, cap_in = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local caps
  if kind == 's' then
    caps = KEYS[4]
    local sum = sliding_sum(KEYS[2], KEYS[3], span)
    if used >= limit then
      -- full for a whole span from now: one entry says as much as the old ones plus the difference, and keeps
      -- the set within `limit` members
      redis.call('DEL', KEYS[2], KEYS[3])
      sliding_add(KEYS[2], KEYS[3], ARGV[2] .. ':' .. limit, limit, span)
    elseif used > sum then
      sliding_add(KEYS[2], KEYS[3], ARGV[2] .. ':' .. fmt(used - sum), used - sum, span)
    end
  else
    caps = KEYS[3]
    local window, count = fixed_count(KEYS[2], span)
    if used > count then fixed_set(KEYS[2], window, used, span) end
  end
  if cap_left >= 0 then add_cap(caps, cap_left, now + cap_in) end
  return {now}
end

-- take: every take of the call in order, each granted on every limit or on none; state read once, written once
local n = tonumber(ARGV[2])
local first = 3 + 3 * n
local cool = tonumber(redis.call('GET', KEYS[1]) or '0')
local limits = {}
local k = 2
for i = 1, n do
  local lim = {kind = ARGV[3 * i], limit = tonumber(ARGV[1 + 3 * i]), span = tonumber(ARGV[2 + 3 * i]), added = 0}
  if lim.kind == 's' then
    lim.z, lim.s = KEYS[k], KEYS[k + 1]
    lim.count = sliding_sum(lim.z, lim.s, lim.span)
    k = k + 2
  else
    lim.h = KEYS[k]
    lim.window, lim.count = fixed_count(lim.h, lim.span)
    k = k + 1
  end
  lim.c = KEYS[k]
  lim.caps = live_caps(lim.c)
  k = k + 1
  limits[i] = lim
end

local answer = {now}
for j = first, #ARGV, 2 do
  local weight = tonumber(ARGV[j])
  local reason, wait = 0, 0
  if cool > now then
    reason, wait = 2, cool - now
  else
    for _, lim in ipairs(limits) do
      if lim.count + weight > lim.limit then
        if lim.kind == 's' then
          wait = math.max(wait, sliding_wait(lim.z, lim.count + weight - lim.limit, lim.span))
        else
          wait = math.max(wait, (lim.window + 1) * lim.span - now)
        end
      end
      for _, cap in ipairs(lim.caps) do
        if weight > cap[2] then wait = math.max(wait, cap[1] - now) end
      end
    end
    if wait > 0 then
      reason = 1
    else
      for _, lim in ipairs(limits) do
        lim.count, lim.added = lim.count + weight, lim.added + weight
        if lim.kind == 's' then redis.call('ZADD', lim.z, now, ARGV[j + 1] .. ':' .. ARGV[j]) end
        for _, cap in ipairs(lim.caps) do cap[2] = cap[2] - weight end
      end
    end
  end
  answer[#answer + 1] = reason
  answer[#answer + 1] = wait
end

for _, lim in ipairs(limits) do
  local left = lim.limit - lim.count
  if lim.added > 0 then
    if lim.kind == 's' then
      local ttl = math.ceil(lim.span / 1000) + 1
      redis.call('INCRBY', lim.s, lim.added)
      redis.call('PEXPIRE', lim.z, ttl)
      redis.call('PEXPIRE', lim.s, ttl)
    else
      fixed_set(lim.h, lim.window, lim.count, lim.span)
    end
    for _, cap in ipairs(lim.caps) do redis.call('HINCRBY', lim.c, cap[3], -lim.added) end
  end
  for _, cap in ipairs(lim.caps) do left = math.min(left, cap[2]) end
  answer[#answer + 1] = math.max(0, left)
end
return answer
