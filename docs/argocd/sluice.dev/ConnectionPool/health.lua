-- Argo CD health check for sluice.dev/ConnectionPool (Lua 5.1, gopher-lua).
-- Order matters:
--   1. status older than the spec (observedGeneration lags)   -> Progressing
--   2. Degraded=True or BudgetExceeded=True                    -> Degraded
--   3. Progressing=True                                        -> Progressing
--   4. Ready=True                                              -> Healthy
--   5. anything else (no status yet, Ready=False)              -> Progressing
local hs = {}

local function condition(status, type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
local generation = obj.metadata.generation

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local budget = condition(status, "BudgetExceeded")
if budget ~= nil and budget.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(budget, "The database connection budget cannot fit the requested replicas")
  return hs
end

local degraded = condition(status, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "Degraded")
  return hs
end

local progressing = condition(status, "Progressing")
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing, "Progressing")
  return hs
end

local ready = condition(status, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "Waiting for pooler pods to become ready")
return hs
