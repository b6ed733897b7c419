"""The Lua scripts the Redis adapter runs: each is one atomic step of the ownership rules.

Keys (``P`` is ``ClusterConfig.key_prefix``)::

    P:owner:IDENTITY   "EPOCH\\tNODE\\tHOST"   who holds the identity, with its fencing epoch
    P:hits:IDENTITY    claims in the current window (cluster-wide flapping), expires with it
    P:moves:IDENTITY   claims that moved it to another host in the current duplicate window
    P:dup:IDENTITY     present while the identity is held as duplicated (PX the hold)
    P:node:NODE        the node's lease (PX node_ttl)
    P:evict:NODE       the node's pub/sub channel of eviction notices "IDENTITY\\tEPOCH\\tBY"
    P:collect:lock     the node that ran the last collector step (PX collect_interval)
    P:collect:cursor   where the collector's SCAN of owner records goes on

Epochs are ``max(previous + 1, store time in microseconds)``: strictly increasing per identity
while its record exists, and still increasing after the record (or the whole store) is lost,
as long as the store's clock does not go back. They stay below 2^53, so Lua's doubles hold them
exactly; they travel as decimal strings, never as Lua numbers printed with ``%g``.

The claim script computes the previous owner's channel name from the prefix (a Redis
Cluster would reject that: one Redis, or a primary with Sentinel, is what this supports).
"""

from __future__ import annotations

__all__ = ["CLAIM", "COLLECT", "RELEASE", "RENEW", "REASSERT"]

#: KEYS: owner, hits, dup, moves. ARGV: node, host, prefix, hits window (ms), identity,
#: deadline (store time, us), most claims per window (0: no limit), most host-changing claims
#: per duplicate window (0: no duplicate detection), duplicate window (ms), hold (ms).
#: Returns {epoch, previous node or "", previous host or "", recent claims}, with epoch "0"
#: when the claim arrived after its deadline (a claim the node gave up on -- a stalled store
#: runs it when it resumes -- must not take an identity over after the fact), "-1" when
#: the identity is flapping cluster-wide (too many claims within the window, on any nodes:
#: refused without touching its owner) and "-2" when two hosts keep taking it from each other
#: (a duplicate identity: the claim from another host is refused, the owner keeps it).
CLAIM = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if now > tonumber(ARGV[6]) then return {'0', '', '', 0} end
local recent = redis.call('INCR', KEYS[2])
if recent == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
local limit = tonumber(ARGV[7])
if limit > 0 and recent > limit then return {'-1', '', '', recent} end
local cur = redis.call('GET', KEYS[1])
local epoch = now
local pnode, phost = '', ''
if cur then
  local e, n, h = string.match(cur, '^(%d+)\t([^\t]*)\t(.*)$')
  if e then
    local pe = tonumber(e)
    if pe + 1 > epoch then epoch = pe + 1 end
    pnode = n
    phost = h
  end
end
local dmost = tonumber(ARGV[8])
if dmost > 0 and phost ~= '' and phost ~= ARGV[2] then
  -- A takeover from another host: counted, and past the limit the identity is held.
  if redis.call('EXISTS', KEYS[3]) == 1 then return {'-2', pnode, phost, recent} end
  local moves = redis.call('INCR', KEYS[4])
  if moves == 1 then redis.call('PEXPIRE', KEYS[4], ARGV[9]) end
  if moves > dmost then
    redis.call('SET', KEYS[3], '1', 'PX', ARGV[10])
    return {'-2', pnode, phost, recent}
  end
end
local es = string.format('%.0f', epoch)
redis.call('SET', KEYS[1], es .. '\t' .. ARGV[1] .. '\t' .. ARGV[2])
if pnode ~= '' and pnode ~= ARGV[1] then
  -- Tell the previous owner; nobody waits on it (a dead node simply has no subscriber).
  -- Told even when its lease is gone: a node whose lease the store lost is still serving
  -- until its next renewal, and must not keep a session another node has taken.
  redis.call('PUBLISH', ARGV[3] .. ':evict:' .. pnode, ARGV[5] .. '\t' .. es .. '\t' .. ARGV[1])
end
return {es, pnode, phost, recent}
"""

#: KEYS: lease. ARGV: ttl (ms), value. Returns {1 if the lease was there, 0 if it was gone
#: (the node then reasserts its sessions: the store may have lost their records as well),
#: seconds, microseconds} -- the store's time, so the node can give claims deadlines in it.
RENEW = r"""
local t = redis.call('TIME')
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 then return {1, t[1], t[2]} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return {0, t[1], t[2]}
"""

#: KEYS: owner. ARGV: epoch, node. Deletes the record only if it is still this very claim's.
RELEASE = r"""
local cur = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. '\t' .. ARGV[2] .. '\t'
if cur and string.sub(cur, 1, string.len(mine)) == mine then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

#: KEYS: owner. ARGV: epoch, node, host. Sets the record if it is missing (the store lost it);
#: returns 1 if this node holds the identity afterwards, 0 if another node claimed it since.
REASSERT = r"""
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1] .. '\t' .. ARGV[2] .. '\t' .. ARGV[3])
  return 1
end
local e, n = string.match(cur, '^(%d+)\t([^\t]*)\t')
if n == ARGV[2] then return 1 end
return 0
"""

#: KEYS: lock, cursor. ARGV: node, interval (ms), batch (SCAN COUNT), MATCH pattern of owner
#: records, prefix. One step of the collector of dead nodes' owner records: a node whose lease
#: is gone serves nothing (it closed its sessions before the lease could expire, or it is
#: dead), so its records only keep identities that may never come back. Returns {deleted,
#: 1 if the pass over the keyspace is complete}, or {-1, 0} when another node ran a step
#: within the interval (the nodes take turns: one batch per interval cluster-wide). Atomic:
#: a record is deleted as it was read, so a claim in between cannot be lost -- and a node that
#: finds its lease gone reasserts its records, as after a store that lost its data.
COLLECT = r"""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {-1, 0} end
local cursor = redis.call('GET', KEYS[2]) or '0'
local found = redis.call('SCAN', cursor, 'MATCH', ARGV[4], 'COUNT', ARGV[3])
redis.call('SET', KEYS[2], found[1])
local alive = {}
local deleted = 0
for _, key in ipairs(found[2]) do
  local cur = redis.pcall('GET', key)
  local node = type(cur) == 'string' and string.match(cur, '^%d+\t([^\t]+)\t') or nil
  if node then
    if alive[node] == nil then
      alive[node] = redis.call('EXISTS', ARGV[5] .. ':node:' .. node) == 1
    end
    if not alive[node] then
      redis.call('DEL', key)
      deleted = deleted + 1
    end
  end
end
if found[1] == '0' then return {deleted, 1} end
return {deleted, 0}
"""
