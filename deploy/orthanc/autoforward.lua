-- boneage-worker: auto-forward pediatric hand radiographs from Orthanc.
--
-- Loaded by Orthanc through "LuaScripts" in orthanc.json (Orthanc >= 1.9, tested
-- with the Debian package 1.10.1). For every stored instance it decides once:
--
--   forward  CR or DX (by Modality or SOP class), hand or wrist by BodyPartExamined,
--            or, when BodyPartExamined is empty, by the coded Anatomic Region
--            Sequence (which a DX must have), or, without either, by the study/
--            series/protocol/requested-procedure description ("HAND", "WRIST",
--            "BONE AGE", ...): the rules of boneage-worker's own gate;
--            Also an IHE IOCM rejection note (a Key Object Selection Document
--            titled DCM 113001, 113037 or 113038): boneage-worker then withdraws
--            what it sent of the images the note rejects;
--   skip     everything else: a DX for processing (raw detector data, which
--            boneage-worker does not assess), and always whatever boneage-worker
--            made or sent (received from its AE title, Manufacturer
--            "boneage-worker", SR or Secondary Capture SOP classes): results must
--            never go back to it.
--
-- Forwarding is an asynchronous Orthanc job (POST /modalities/BONEAGE/store with
-- "Asynchronous": true), so a slow or absent boneage-worker never blocks the Lua
-- thread. A failed job stays in /jobs (keep "SaveJobs": true); resend it with
-- POST /jobs/<id>/resubmit. Failures are logged and marked on the instances.
--
-- The decision is written to the instance metadata "BoneAgeRouting" when that
-- name is declared under "UserMetadata" in orthanc.json, so an administrator
-- can ask Orthanc why an image was or was not sent:
--   GET /instances/<id>/metadata/BoneAgeRouting
--
-- Log lines carry Orthanc resource ids (hashes) and attribute values that are
-- not patient identifiers; never names, ids or UIDs.

-- Symbolic name of boneage-worker in "DicomModalities" (not necessarily its AE title).
local TARGET = 'BONEAGE'
-- Manufacturer (General Equipment) of every object boneage-worker makes.
local OUR_MANUFACTURER = 'boneage-worker'
-- User-defined metadata that records the routing decision (optional).
local ROUTING_METADATA = 'BoneAgeRouting'

local RADIOGRAPH_MODALITIES = { CR = true, DX = true }
local RADIOGRAPH_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,    -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true   -- Digital X-Ray Image Storage - For Presentation
}
-- Digital X-Ray Image Storage - For Processing: the detector's raw data, not for display.
local DX_FOR_PROCESSING = '1.2.840.10008.5.1.4.1.1.1.1.1'
-- Words of a Body Part Examined value (PS3.16 Annex L, and spellings seen in the
-- field), read as boneage-worker's gate reads them: a hand, or a hand with its fingers
-- (HAND_WRIST, WRIST_HAND, HAND\FINGER), is forwarded; fingers alone (FINGER, THUMB)
-- are not, the gate refusing them; side words (L HAND, HAND_LT, RT HAND) say nothing
-- of the part; a region the hand is part of (EXTREMITY, UPPER EXTREMITY, ARM) says no
-- more than an empty value, and the coded region or the descriptions decide.
local HAND_WORDS_OF_A_PART = {
  HAND = true, HANDS = true, WRIST = true, CARPUS = true, HANDWRIST = true
}
local FINGER_WORDS = { FINGER = true, FINGERS = true, THUMB = true, THUMBS = true }
local SIDE_WORDS = {
  L = true, R = true, LT = true, RT = true, LFT = true, RGT = true, LEFT = true,
  RIGHT = true, LINKS = true, RECHTS = true, AND = true, BOTH = true, BILAT = true,
  BILATERAL = true, BEIDE = true
}
local GENERIC_BODY_PARTS = {
  EXTREMITY = true, EXTREMITIES = true, UPPER_EXTREMITY = true, UPPER_EXTREMITIES = true,
  UPPEREXTREMITY = true, UPPER_LIMB = true, UPPERLIMB = true, LIMB = true, ARM = true,
  ARMS = true
}
-- Anatomic Region Sequence codes of a hand or wrist (PS3.16 CID 4031 and Annex L;
-- SNOMED CT, and the SNOMED-RT codes of older modalities).
local HAND_REGIONS = {
  ['SCT 85562004'] = true, ['SCT 24097009'] = true, ['SCT 74670003'] = true,
  ['SCT 8205005'] = true, ['SRT T-D8700'] = true, ['SRT T-15460'] = true
}
-- Coded regions the hand is part of (Extremity, Upper limb, Bone of upper limb): not
-- stated, as GENERIC_BODY_PARTS are.
local GENERIC_REGIONS = {
  ['SCT 66019005'] = true, ['SCT 53120007'] = true, ['SCT 371195002'] = true,
  ['SRT T-D0300'] = true, ['SRT T-D8000'] = true, ['SRT T-D0821'] = true
}
-- Words searched, whole, in the descriptions when Body Part Examined is empty.
local HAND_WORDS = {
  'HAND', 'HANDS', 'WRIST', 'CARPUS', 'BONE AGE', 'BONEAGE', 'SKELETAL AGE',
  'KNOCHENALTER', 'MAIN', 'POIGNET'
}
-- Key Object Selection Document Storage, and the titles (DCM) of IOCM rejection notes.
local KEY_OBJECT_SELECTION = '1.2.840.10008.5.1.4.1.1.88.59'
local REJECTION_TITLES = {
  ['113001'] = 'Rejected for Quality Reasons',
  ['113037'] = 'Rejected for Patient Safety Reasons',
  ['113038'] = 'Incorrect Modality Worklist Entry',
  ['113039'] = 'Data Retention Policy Expired'
}
-- Not forwarded: by 113039 a PACS removes whole studies, ours with them, and it would
-- forward every study it ever expires.
local REJECTIONS_KEPT = { ['113039'] = true }
local DESCRIPTIONS = {
  'StudyDescription', 'SeriesDescription', 'ProtocolName', 'RequestedProcedureDescription'
}

local targetAet = nil

-- AE title of the TARGET modality, read once from Orthanc's own configuration.
local function TargetAet()
  if targetAet == nil then
    local ok, answer = pcall(RestApiGet, '/modalities/' .. TARGET .. '/configuration')
    if ok and answer ~= nil and answer ~= '' then
      targetAet = ParseJson(answer)['AET']
    else
      print('boneage autoforward: modality ' .. TARGET .. ' is not declared in DicomModalities')
      targetAet = TARGET
    end
  end
  return targetAet
end

local function Trim(value)
  return (string.gsub(value or '', '^%s*(.-)%s*$', '%1'))
end

local function Upper(value)
  return string.upper(Trim(value))
end

-- Whole-word search: every non-alphanumeric run becomes one space.
local function MentionsHand(tags)
  local text = {}
  for _, keyword in ipairs(DESCRIPTIONS) do
    table.insert(text, Upper(tags[keyword]))
  end
  local words = ' ' .. string.gsub(table.concat(text, ' '), '[^%w]+', ' ') .. ' '
  for _, word in ipairs(HAND_WORDS) do
    if string.find(words, ' ' .. word .. ' ', 1, true) then
      return true
    end
  end
  return false
end

-- What one value of Body Part Examined states: 'hand', 'finger' (fingers alone),
-- 'none' (nothing, or a region the hand is part of) or 'other'.
local function BodyPartValue(value)
  local words, hand, finger, other = {}, false, false, false
  for word in string.gmatch(value, '%w+') do
    if not SIDE_WORDS[word] then
      table.insert(words, word)
      if HAND_WORDS_OF_A_PART[word] then
        hand = true
      elseif FINGER_WORDS[word] then
        finger = true
      else
        other = true
      end
    end
  end
  if #words == 0 or GENERIC_BODY_PARTS[table.concat(words, '_')] then
    return 'none'
  end
  if other then
    return 'other'
  end
  return hand and 'hand' or (finger and 'finger' or 'other')
end

-- What Body Part Examined states, value by value (HAND\WRIST), and the value as a
-- decision shows it: any other part is 'other'; else a hand where one value is one;
-- else fingers alone where one is; else 'none'.
local function BodyPart(tags)
  local value = string.gsub(Upper(tags['BodyPartExamined']), '[%s%-]+', '_')
  local stated = {}
  for part in string.gmatch(value, '[^\\]+') do
    stated[BodyPartValue(part)] = true
  end
  for _, verdict in ipairs({ 'other', 'hand', 'finger' }) do
    if stated[verdict] then
      return verdict, value
    end
  end
  return 'none', value
end

-- 'SCHEME CODE' and the meaning of the first coded item of the Anatomic Region
-- Sequence, or nil (Orthanc gives a sequence as a list of tables of tags).
local function AnatomicRegion(tags)
  local items = tags['AnatomicRegionSequence']
  if type(items) ~= 'table' then
    return nil
  end
  for _, item in ipairs(items) do
    if type(item) == 'table' and type(item['CodeValue']) == 'string'
      and type(item['CodingSchemeDesignator']) == 'string' then
      local scheme, value = Upper(item['CodingSchemeDesignator']), Upper(item['CodeValue'])
      if scheme ~= '' and value ~= '' then
        local meaning = type(item['CodeMeaning']) == 'string' and Trim(item['CodeMeaning']) or ''
        return scheme .. ' ' .. value, meaning
      end
    end
  end
  return nil
end

-- The code value of a Key Object Selection's document title when its scheme is DCM.
local function DocumentTitle(tags)
  local items = tags['ConceptNameCodeSequence']
  if type(items) ~= 'table' or type(items[1]) ~= 'table' then
    return nil
  end
  if Trim(items[1]['CodingSchemeDesignator']) ~= 'DCM' then
    return nil
  end
  return Trim(items[1]['CodeValue'])
end

-- Returns (forward, reason); reason never holds patient data.
function BoneAgeRoutingDecision(tags, origin)
  local requestOrigin = origin['RequestOrigin'] or ''
  if requestOrigin == 'Lua' then
    return false, 'made by a Lua script'
  end
  if requestOrigin == 'DicomProtocol' and Upper(origin['RemoteAet']) == Upper(TargetAet()) then
    return false, 'received from ' .. TARGET
  end
  if Trim(tags['Manufacturer']) == OUR_MANUFACTURER then
    return false, 'made by boneage-worker'
  end
  local sopClass = Trim(tags['SOPClassUID'])
  if sopClass == KEY_OBJECT_SELECTION then
    local title = DocumentTitle(tags)
    if title ~= nil and REJECTION_TITLES[title] then
      local note = 'rejection note ' .. title .. ' (' .. REJECTION_TITLES[title] .. ')'
      if REJECTIONS_KEPT[title] then
        return false, note .. ': its study is removed whole'
      end
      return true, note
    end
    return false, 'key object selection, not a rejection note'
  end
  -- Structured reports (1.2.840.10008.5.1.4.1.1.88.*) and Secondary Captures
  -- (1.2.840.10008.5.1.4.1.1.7*) are what boneage-worker sends back.
  if string.find(sopClass, '1.2.840.10008.5.1.4.1.1.88.', 1, true) == 1
    or sopClass == '1.2.840.10008.5.1.4.1.1.7'
    or string.find(sopClass, '1.2.840.10008.5.1.4.1.1.7.', 1, true) == 1 then
    return false, 'SR or Secondary Capture'
  end
  local modality = Upper(tags['Modality'])
  if sopClass == DX_FOR_PROCESSING or Upper(tags['PresentationIntentType']) == 'FOR PROCESSING' then
    return false, 'DX for processing (raw detector data)'
  end
  if not RADIOGRAPH_MODALITIES[modality] and not RADIOGRAPH_SOP_CLASSES[sopClass] then
    return false, 'modality ' .. (modality ~= '' and modality or 'empty') .. ', not CR or DX'
  end
  local bodyPart, shown = BodyPart(tags)
  if bodyPart == 'hand' then
    return true, 'body part ' .. shown
  elseif bodyPart == 'finger' then
    return false, 'body part ' .. shown .. ', fingers alone, not a whole hand'
  elseif bodyPart == 'other' then
    return false, 'body part ' .. shown .. ', not a hand'
  end
  local region, meaning = AnatomicRegion(tags)
  if region ~= nil and GENERIC_REGIONS[region] then
    region = nil -- the upper limb: the descriptions say whether it is the hand
  end
  if region ~= nil then
    if HAND_REGIONS[region] then
      return true, 'anatomic region ' .. region .. ' (' .. meaning .. ')'
    end
    return false, 'anatomic region ' .. region .. ' (' .. meaning .. '), not a hand'
  end
  if MentionsHand(tags) then
    return true, 'description mentions the hand or bone age'
  end
  return false, 'no body part and no hand in the descriptions'
end

local function Mark(instanceId, text)
  -- Fails quietly when ROUTING_METADATA is not declared under "UserMetadata".
  pcall(RestApiPut, '/instances/' .. instanceId .. '/metadata/' .. ROUTING_METADATA, text)
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  local forward, reason = BoneAgeRoutingDecision(tags, origin)
  if not forward then
    Mark(instanceId, 'skipped: ' .. reason)
    return
  end
  local request = { Resources = { instanceId }, Asynchronous = true, Permissive = false }
  local ok, answer = pcall(RestApiPost, '/modalities/' .. TARGET .. '/store',
                           DumpJson(request, true))
  if ok and answer ~= nil and answer ~= '' then
    local job = ParseJson(answer)['ID'] or '?'
    Mark(instanceId, 'forwarded: ' .. reason .. ' (job ' .. job .. ')')
    print('boneage autoforward: instance ' .. instanceId .. ' queued to ' .. TARGET ..
          ' (' .. reason .. ', job ' .. job .. ')')
  else
    Mark(instanceId, 'forward failed: could not create the job')
    print('boneage autoforward: ERROR cannot queue instance ' .. instanceId .. ' to ' .. TARGET)
  end
end

function OnJobFailure(jobId)
  local ok, answer = pcall(RestApiGet, '/jobs/' .. jobId)
  if not ok or answer == nil or answer == '' then
    return
  end
  local job = ParseJson(answer)
  local content = job['Content'] or {}
  if job['Type'] ~= 'DicomModalityStore' or Upper(content['RemoteAet']) ~= Upper(TargetAet()) then
    return
  end
  print('boneage autoforward: ERROR job ' .. jobId .. ' to ' .. TARGET .. ' failed (' ..
        tostring(job['ErrorDescription']) .. '); resend with POST /jobs/' .. jobId .. '/resubmit')
  for _, instanceId in ipairs(content['ParentResources'] or {}) do
    Mark(instanceId, 'forward failed: job ' .. jobId)
  end
end
