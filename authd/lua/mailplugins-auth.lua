-- Dovecot (2.3.17+ / 2.4) Lua passdb asking mailplugins authd to verify passwords over HTTP.
--
--   passdb {
--     driver = lua
--     args = file=/etc/dovecot/mailplugins-auth.lua blocking=yes
--   }
--
-- Dovecot 2.3 refuses extra passdb args, so the address of authd's http_listen is the `url`
-- line below: edit it to match (it is the only setting).
--
-- authd answers 200 (good), 403 (bad password or service not allowed), 404 (unknown user),
-- 423 (disabled) and 5xx (temporary failure). App passwords, per-service flags, rehashing and
-- brute-force penalties all happen in authd. Needs Debian's dovecot-auth-lua package.
--
-- Master users: the same script as a master passdb (`master = yes`, without
-- result_success = continue) sends Dovecot's login_user (the mailbox a master user logs in as);
-- authd checks the master flag, the master's password and that mailbox.

local url = "http://127.0.0.1:9643/verify"
-- authd always answers within 10 s (its request_timeout is at most 9.5 s).
local http = dovecot.http.client({ timeout = 10000, max_attempts = 1 })

local function enc(s)
  return (tostring(s or ""):gsub("[^%w%-%._~]",
    function(c) return string.format("%%%02X", string.byte(c)) end))
end

function auth_password_verify(req, pass)
  local secured = ""
  if req.secured == true or req.secured == "yes" or req.secured == "1" then secured = "1" end
  local r = http:request({ url = url, method = "POST" })
  r:add_header("Content-Type", "application/x-www-form-urlencoded")
  r:set_payload("user=" .. enc(req.user) .. "&service=" .. enc(req.service) ..
                "&rip=" .. enc(req.rip) .. "&secured=" .. secured ..
                "&authzid=" .. enc(req.login_user) .. "&password=" .. enc(pass))
  local s = r:submit():status()
  if s == 200 then return dovecot.auth.PASSDB_RESULT_OK, "" end
  if s == 403 then return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, "" end
  if s == 404 then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "" end
  if s == 423 then return dovecot.auth.PASSDB_RESULT_USER_DISABLED, "" end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "authd HTTP " .. s
end

function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
end
