-- shardmeter: apply the increments of one (writer, lane) at most once (see src/sink/redis.rs).
--
-- A lane is a Redis Cluster hash slot (on one Redis: a batch sequence modulo 256). One call
-- carries, for one writer and one lane, the increments of every batch of a write that fall in
-- that lane. Every key below is declared and, on a Cluster, in the lane's slot.
--
-- KEYS[1]                the dedup record of (writer, lane): the highest batch sequence applied
-- KEYS[i + 1]            the i-th counter key, i = 1..n
-- ARGV[1]                the highest batch sequence among this call's batches, in decimal
-- ARGV[2]                the record's time-to-live in seconds: the dedup window
-- ARGV[2i + 1]           the i-th amount
-- ARGV[2i + 2]           the i-th time-to-live in seconds; positive: set only if INCRBY created
--                        the key, negative: set anyway (the caller's periodic TTL refresh)
--
-- Reply: {applied, r1, ..., rn} where applied is
--   1   applied now; ri is
--         an integer   the counter's new total,
--         {string}     the new total in decimal, when it is too large for a Lua number
--                      (|total| >= 2^53) to carry exactly,
--         a string     why INCRBY refused the key (WRONGTYPE, not an integer, overflow);
--                      that key is unchanged;
--   0   applied before (the record already holds this sequence or a later one): nothing
--       changed now; ri is {string}, the key's current value (a GET; '0' if it is gone), or
--       a string when it holds no integer.
-- Or an error reply starting with NOPERM, nothing written: the user's ACL forbids a command the
-- script runs (checked on Redis 7+, which has redis.acl_check_cmd; about 0.2 us per check).
-- Locals save a global table lookup per call.
local rcall, rpcall = redis.call, redis.pcall
local record, sequence, record_ttl = KEYS[1], ARGV[1], ARGV[2]

-- Decimal strings without leading zeros: a longer one is larger, else compare the digits.
local function at_least(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a >= b
end

-- Redis 7+: if the user's ACL forbids a command run after the first write, refuse the whole
-- call before writing anything; else part of it would stay applied under the record and the
-- rest be reported as refused keys. (A forbidden SET, the first write, aborts before anything
-- is written. Redis checked every declared key against the user's key patterns already.)
if redis.acl_check_cmd then
  local key = KEYS[2] or record
  if not (redis.acl_check_cmd('INCRBY', key, '1')
      and redis.acl_check_cmd('EXPIRE', key, '1')
      and redis.acl_check_cmd('GET', key)) then
    return redis.error_reply('NOPERM the ACL of this user forbids INCRBY, EXPIRE or GET')
  end
end

-- One command reads the record and writes the new one (SET ... GET, Redis 6.2+).
local last = rcall('SET', record, sequence, 'GET', 'EX', record_ttl)
local reply = {}
if last and at_least(last, sequence) then
  -- Applied before. Put the record back: it must never move down.
  rcall('SET', record, last, 'EX', record_ttl)
  reply[1] = 0
  for i = 2, #KEYS do
    local value = rpcall('GET', KEYS[i])
    if type(value) == 'table' then
      reply[i] = tostring(value.err or value)
    else
      reply[i] = {value or '0'}
    end
  end
  return reply
end

reply[1] = 1
for i = 2, #KEYS do
  local key = KEYS[i]
  local amount = ARGV[2 * i - 1]
  -- pcall: a refusal of this key must not abort the script, or the keys before it would stay
  -- applied under a record while the caller saw an error.
  local total = rpcall('INCRBY', key, amount)
  if type(total) == 'table' then
    reply[i] = tostring(total.err or total)
  else
    local ttl = tonumber(ARGV[2 * i])
    -- A new key (the total is the amount: exact as doubles whenever it is exact as integers),
    -- or a refresh asked by the caller. The caller checked the TTL (1 s to 2^50 s).
    if ttl < 0 then
      rcall('EXPIRE', key, -ttl)
    elseif total == tonumber(amount) then
      rcall('EXPIRE', key, ttl)
    end
    if total >= 9007199254740992 or total <= -9007199254740992 then
      -- Lua numbers are doubles: read the exact value back as a string.
      reply[i] = {rcall('GET', key)}
    else
      reply[i] = total
    end
  end
end
return reply
