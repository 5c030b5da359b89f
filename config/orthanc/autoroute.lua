-- Lung Vision auto-routing for Orthanc (loaded through "LuaScripts" in orthanc.json).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), send its chest radiographs
-- (CR/DX series of the chest, or with no body part; Secondary Captures with chest hints) to the
-- modality "lungvision" — and never anything Lung Vision made, never anything twice:
--
--   1. Lung Vision's own objects are never sent: our UID root on the SOP Instance or Series Instance
--      UID, Manufacturer "Lung Vision", or received from Lung Vision's AE title.
--   2. An instance is sent at most once: each instance handed to the store job gets the metadata
--      "LungVisionRouted" (value: the Orthanc job id); instances carrying it are never sent again.
--      So when our results arrive and the study becomes stable again, there is nothing left to send.
--      Instances added to the study later are sent (once) on their own.
--   3. A study that already holds Lung Vision results although this Orthanc never routed any of its
--      instances (e.g. imported together with its results) is not sent.
--
-- Keep these in step with common/identity.py and worker/select.py.

local MODALITY = 'lungvision'                    -- the "DicomModalities" entry of Lung Vision
local UID_ROOT = '1.2.826.0.1.3680043.10.1514.'  -- common.identity.UID_ROOT
local MANUFACTURER = 'Lung Vision'               -- common.identity.MANUFACTURER
local ROUTED = 'LungVisionRouted'                -- "UserMetadata" entry in orthanc.json
local RADIOGRAPHS = { CR = true, DX = true }
local SECONDARY_CAPTURE = '1.2.840.10008.5.1.4.1.1.7'
local CHEST_BODY_PARTS = { CHEST = true, THORAX = true }
local CHEST_WORDS = { 'CHEST', 'THORAX', 'THORAC', 'LUNG', 'CXR', 'PNEUMO' }

local LUNGVISION_AET = GetOrthancConfiguration()['DicomModalities'][MODALITY]['AET']

local function Log(message)
  print('lungvision-autoroute: ' .. message)
end

local function Upper(value)
  return string.upper(value or '')
end

local function StartsWith(value, prefix)
  return value ~= nil and string.sub(value, 1, string.len(prefix)) == prefix
end

local function HasChestWord(text)
  for _, word in ipairs(CHEST_WORDS) do
    if string.find(text, word, 1, true) then
      return true
    end
  end
  return false
end

local function IsOurSeries(tags)
  return StartsWith(tags['SeriesInstanceUID'], UID_ROOT) or Upper(tags['Manufacturer']) == Upper(MANUFACTURER)
end

local function IsOurInstance(instance, metadata)
  return StartsWith(instance['MainDicomTags']['SOPInstanceUID'], UID_ROOT) or
    (metadata['RemoteAET'] ~= nil and metadata['RemoteAET'] == LUNGVISION_AET)
end

-- A CR/DX series of the chest (or without body part), or a Secondary Capture with chest hints.
local function IsChestSeries(series, studyDescription, firstInstanceMetadata)
  local tags = series['MainDicomTags']
  local bodyPart = Upper(tags['BodyPartExamined'])
  local words = studyDescription .. ' ' .. Upper(tags['SeriesDescription']) .. ' ' .. Upper(tags['ProtocolName'])
  if RADIOGRAPHS[Upper(tags['Modality'])] then
    return bodyPart == '' or CHEST_BODY_PARTS[bodyPart] ~= nil
  end
  if firstInstanceMetadata['SopClassUid'] == SECONDARY_CAPTURE then
    return CHEST_BODY_PARTS[bodyPart] ~= nil or HasChestWord(words)
  end
  return false
end

local function Route(studyId, studyTags)
  local studyDescription = Upper(studyTags['StudyDescription'])
  local toSend = {}
  local ours = 0
  local routedBefore = 0
  local notChest = 0
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local instances = ParseJson(RestApiGet('/series/' .. series['ID'] .. '/instances'))
    local metadata = {}
    for index, instance in ipairs(instances) do
      metadata[index] = ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/metadata?expand'))
    end
    local chest = #instances > 0 and IsChestSeries(series, studyDescription, metadata[1])
    for index, instance in ipairs(instances) do
      if IsOurSeries(series['MainDicomTags']) or IsOurInstance(instance, metadata[index]) then
        ours = ours + 1
      elseif metadata[index][ROUTED] ~= nil then
        routedBefore = routedBefore + 1
      elseif chest then
        table.insert(toSend, instance['ID'])
      else
        notChest = notChest + 1
      end
    end
  end

  local counts = 'Lung Vision objects: ' .. ours .. ', sent before: ' .. routedBefore .. ', not chest: ' .. notChest
  if #toSend == 0 then
    Log('study ' .. studyId .. ': nothing to send (' .. counts .. ')')
    return
  end
  if ours > 0 and routedBefore == 0 then
    Log('study ' .. studyId .. ': not sent, it already holds Lung Vision results but was never routed from here (' ..
        counts .. ')')
    return
  end

  local job = ParseJson(RestApiPost('/modalities/' .. MODALITY .. '/store',
                                    DumpJson({ Resources = toSend, Synchronous = false }, true)))
  for _, instanceId in ipairs(toSend) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. ROUTED, job['ID'])
  end
  Log('study ' .. studyId .. ': ' .. #toSend .. ' instance(s) sent to ' .. MODALITY .. ' (job ' .. job['ID'] .. '; ' ..
      counts .. ')')
end

function OnStableStudy(studyId, tags, metadata)
  local ok, problem = pcall(Route, studyId, tags)
  if not ok then
    Log('study ' .. studyId .. ': routing failed: ' .. tostring(problem))
  end
end
