-- Argo CD health check for fljob.dev/FLJob (resource.customizations.health.fljob.dev_FLJob in argocd-cm).
-- Follows Argo CD's own check for batch Jobs: a job on its way or running is Progressing, one that ended as it
-- should is Healthy, one that failed (or ran past its deadline, or waits on something only a person can fix) is
-- Degraded. tests/operator.rs runs it (Lua 5.1, as Argo CD's gopher-lua) against live FLJobs.
local hs = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local conditions = {}
for _, c in ipairs(obj.status.conditions or {}) do
  conditions[c.type] = c
end
local phase = obj.status.phase or "Pending"
local message = obj.status.message or ""
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message ~= "" and message or "the job succeeded"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = (obj.status.reason or "Failed") .. ": " .. message
elseif phase == "Aborted" then
  if obj.status.reason == "DeadlineExceeded" then
    hs.status = "Degraded"
  else
    hs.status = "Healthy"
  end
  hs.message = message
elseif conditions["Stalled"] ~= nil and conditions["Stalled"].status == "True" then
  hs.status = "Degraded"
  hs.message = conditions["Stalled"].reason .. ": " .. conditions["Stalled"].message
else
  hs.status = "Progressing"
  local r = conditions["Reconciling"]
  if r ~= nil and r.status == "True" then
    hs.message = phase .. ": " .. r.message
  else
    hs.message = phase
  end
end
return hs
