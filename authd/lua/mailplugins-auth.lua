-- Dovecot 2.3.17+ and 2.4: passdb and userdb answered by mailplugins authd over HTTP.
--
--   Dovecot 2.4                               Dovecot 2.3 (userdb: authd's dict, or this)
--   passdb lua {                              passdb {
--     lua_file = /etc/dovecot/mailplugins-auth.lua  driver = lua
--   }                                           args = file=/etc/dovecot/mailplugins-auth.lua blocking=yes
--   userdb lua {                              }
--     lua_file = /etc/dovecot/mailplugins-auth.lua
--   }
--
-- `mailplugins dovecot-config` writes these blocks. The address of authd's http_listen is the
-- `base` line below (Dovecot 2.3 refuses extra passdb args): the generator writes a copy with
-- the right address when http_listen is not 127.0.0.1:9643.
--
-- POST /verify: 200 good, 403 bad password (or service not allowed), 404 unknown user,
--   423 disabled, anything else (5xx, or authd unreachable) a temporary failure, never
--   "wrong password".
-- POST /userdb: 200 with one "field=value" line per userdb field, 404 unknown user.
-- POST /users:  200 with one user per line (doveadm user '*', doveadm -A).
-- App passwords, per-service flags, rehashing and brute-force penalties all happen in authd.
-- Needs Debian's dovecot-auth-lua package.
--
-- Master users: the same script as a master passdb (`master = yes`, without
-- result_success = continue) sends Dovecot's login_user (the mailbox a master user logs in as)
-- as authzid; authd checks the master flag, the master's password and that mailbox.

local base = "http://127.0.0.1:9643"

-- Dovecot 2.4 refuses the 2.3 HTTP client settings ("max_attempts is unknown setting"); 2.3
-- ignores the 2.4 names. Try 2.3's first: an error means 2.4. authd always answers within
-- 10 s (its request_timeout is at most 9.5 s).
local dovecot24 = false
local ok, http = pcall(dovecot.http.client, { request_timeout_msecs = 10000, max_attempts = 1 })
if not ok then
  dovecot24 = true
  http = dovecot.http.client({ request_timeout = "10s", request_max_attempts = 1 })
end
local release = dovecot24 and "2.4" or "2.3"

local function enc(s)
  return (tostring(s or ""):gsub("[^%w%-%._~]",
    function(c) return string.format("%%%02X", string.byte(c)) end))
end

-- 2.4 renamed req.service/req.rip to req.protocol/req.remote_ip (the old names read nil) and
-- made req.secured a string ("secured", "TLS" or "").
local function service(req) return req.protocol or req.service end
local function remote_ip(req) return req.remote_ip or req.rip end
local function secured(req)
  local s = req.secured
  if s == true or s == "secured" or s == "TLS" or s == "yes" or s == "1" then return "1" end
  return ""
end

local function post(path, payload)
  local r = http:request({ url = base .. path, method = "POST" })
  r:add_header("Content-Type", "application/x-www-form-urlencoded")
  r:set_payload(payload)
  local response = r:submit()
  return response:status(), response
end

-- Both releases accept {} on success and "" on failure (2.4 refuses a string on success and a
-- table on failure; 2.3.19 refuses nil).
function auth_password_verify(req, pass)
  local s = post("/verify", "user=" .. enc(req.user) .. "&service=" .. enc(service(req)) ..
                 "&rip=" .. enc(remote_ip(req)) .. "&secured=" .. secured(req) ..
                 "&authzid=" .. enc(req.login_user) .. "&password=" .. enc(pass))
  if s == 200 then return dovecot.auth.PASSDB_RESULT_OK, {} end
  if s == 403 then return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, "" end
  if s == 404 then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "" end
  if s == 423 then return dovecot.auth.PASSDB_RESULT_USER_DISABLED, "" end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "authd HTTP " .. s
end

function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
end

function auth_userdb_lookup(req)
  local s, response = post("/userdb", "user=" .. enc(req.user) .. "&service=" ..
                           enc(service(req)) .. "&dovecot=" .. release)
  if s == 404 then return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "" end
  if s ~= 200 then return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, "authd HTTP " .. s end
  local fields = {}
  for key, value in string.gmatch(response:payload(), "([%w_]+)=([^\n]*)\n") do
    fields[key] = value
  end
  return dovecot.auth.USERDB_RESULT_OK, fields
end

function auth_userdb_iterate()
  local s, response = post("/users", "dovecot=" .. release)
  local users = {}
  if s ~= 200 then
    -- No error value exists for iteration: log it, list nobody rather than a partial list.
    dovecot.i_error("mailplugins: authd HTTP " .. s .. " listing users")
    return users
  end
  for user in string.gmatch(response:payload(), "([^\n]+)\n") do
    table.insert(users, user)
  end
  return users
end
