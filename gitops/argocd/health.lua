-- Argo CD health check for modeldeploy.io/ModelDeployment.
--
-- The operator writes kstatus conditions (Ready, Reconciling, Stalled) and observedGeneration;
-- this maps them onto Argo CD's health states. Argo CD runs it with gopher-lua (Lua 5.1), with
-- the object as the global `obj`.
local hs = {}

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the ModelDeployment"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    conditions[condition.type] = condition
  end
end

local function is_true(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end

local function message_of(kind, fallback)
  local condition = conditions[kind]
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return fallback
end

if is_true("Stalled") then
  hs.status = "Degraded"
  hs.message = message_of("Stalled", "The ModelDeployment cannot make progress")
elseif is_true("Ready") then
  hs.status = "Healthy"
  hs.message = message_of("Ready", "The model is served")
else
  hs.status = "Progressing"
  hs.message = message_of("Reconciling", message_of("Ready", "Waiting for the model to be served"))
end
return hs
