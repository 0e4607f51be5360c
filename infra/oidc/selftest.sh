#!/usr/bin/env bash
# Self-test of the test OpenID Provider (provider.mjs), with curl and node only (no browser): starts
# it on a free port, then for each client auth method (client_secret_basic, client_secret_post,
# private_key_jwt with an EC P-256 and with an RSA key) runs the authorization code flow with PKCE
# S256, state and nonce, through the login form, and checks the ID token (RS256 signature against
# the jwks, iss, aud, nonce, acr, amr, sub), userinfo, a wrong password (401), a missing PKCE
# challenge, a replayed code, single sign-on for a second client, the stdout contract, that the log
# holds no password, secret, code or token, and a clean exit on SIGTERM.
#
#   infra/oidc/selftest.sh        # exit 0: all checks passed; otherwise the first failure on stderr
#
# Needs `infra/oidc-provider install` to have run (node_modules present).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [[ ! -d "$here/node_modules/oidc-provider" ]]; then
  echo "selftest: $here/node_modules is missing: run infra/oidc-provider install first" >&2
  exit 1
fi

tmp=$(mktemp -d)
op_pid=""
cleanup() {
  if [[ -n "$op_pid" ]] && kill -0 "$op_pid" 2>/dev/null; then kill "$op_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
  echo "selftest FAILED: $*" >&2
  if [[ -s "$tmp/op.err" ]]; then
    echo "--- provider stderr (last 30 lines) ---" >&2
    tail -n 30 "$tmp/op.err" >&2
  fi
  exit 1
}
ok() { echo "ok  $*"; }
# js CODE ARGS...: run a snippet of JavaScript; ARGS in process.argv[1..].
js() { local code=$1; shift; node -e "$code" -- "$@"; }
rand() { js 'process.stdout.write(require("crypto").randomBytes(+process.argv[1]).toString("base64url"))' "$1"; }
# jget FILE EXPR: evaluate EXPR with `j` = the JSON in FILE; print strings raw, the rest as JSON.
jget() {
  js 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      const v = (0, eval)("(j) => (" + process.argv[2] + ")")(j);
      process.stdout.write(typeof v === "string" ? v : JSON.stringify(v));' "$1" "$2"
}
# query URL NAME: a query parameter of URL (empty if absent).
query() { js 'process.stdout.write(new URL(process.argv[1]).searchParams.get(process.argv[2]) ?? "")' "$1" "$2"; }

# req NAME JAR CURL_ARGS...: one request, no redirects followed; sets STATUS and LOCATION (absolute),
# leaves the body in $tmp/NAME.body.
req() {
  local name=$1 jar=$2; shift 2
  local out
  out=$(curl -sS --max-time 10 -b "$jar" -c "$jar" -o "$tmp/$name.body" -w '%{http_code} %{redirect_url}' "$@") \
    || fail "$name: curl failed"
  STATUS=${out%% *}
  LOCATION=${out#* }
}

secrets=() # everything that must never show up in the provider's log

# --- keys for the private_key_jwt clients -------------------------------------------------------
# keygen ec|rsa PRIVATE_JWK_FILE: prints the public JWK (with kid, alg, use).
keygen() {
  js 'const c = require("crypto"), fs = require("fs");
      const [kind, file] = process.argv.slice(1);
      const { privateKey, publicKey } = kind === "ec"
        ? c.generateKeyPairSync("ec", { namedCurve: "P-256" })
        : c.generateKeyPairSync("rsa", { modulusLength: 2048 });
      const meta = { kid: kind + "-" + c.randomBytes(4).toString("hex"), alg: kind === "ec" ? "ES256" : "RS256", use: "sig" };
      fs.writeFileSync(file, JSON.stringify({ ...privateKey.export({ format: "jwk" }), ...meta }));
      process.stdout.write(JSON.stringify({ ...publicKey.export({ format: "jwk" }), ...meta }));' "$1" "$2"
}
# assertion PRIVATE_JWK_FILE CLIENT_ID AUDIENCE: a signed client assertion JWT (RFC 7523).
assertion() {
  js 'const c = require("crypto"), fs = require("fs");
      const [file, clientId, aud] = process.argv.slice(1);
      const jwk = JSON.parse(fs.readFileSync(file, "utf8"));
      const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
      const now = Math.floor(Date.now() / 1000);
      const input = b64({ alg: jwk.alg, kid: jwk.kid, typ: "JWT" }) + "." + b64({
        iss: clientId, sub: clientId, aud, jti: c.randomUUID(), iat: now, exp: now + 60 });
      const key = c.createPrivateKey({ key: jwk, format: "jwk" });
      const sig = c.sign("sha256", Buffer.from(input), jwk.kty === "EC" ? { key, dsaEncoding: "ieee-p1363" } : key);
      process.stdout.write(input + "." + sig.toString("base64url"));' "$1" "$2" "$3"
}
ec_public=$(keygen ec "$tmp/ec.jwk")
rsa_public=$(keygen rsa "$tmp/rsa.jwk")

# --- start the provider ---------------------------------------------------------------------------
redirect_uri="http://127.0.0.1:9/cb"
secret_basic="s3cret-basic-$(rand 24)"
secret_post="s3cret-post-$(rand 24)"
secrets+=("$secret_basic" "$secret_post")
clients=$(cat <<EOF
[{"client_id":"cairn","client_secret":"$secret_basic","redirect_uris":["$redirect_uri"],"token_endpoint_auth_method":"client_secret_basic","grant_types":["authorization_code","refresh_token"]},
 {"client_id":"cairn-post","client_secret":"$secret_post","redirect_uris":["$redirect_uri"],"token_endpoint_auth_method":"client_secret_post"},
 {"client_id":"cairn-jwt-ec","redirect_uris":["$redirect_uri"],"token_endpoint_auth_method":"private_key_jwt","jwks":{"keys":[$ec_public]}},
 {"client_id":"cairn-jwt-rsa","redirect_uris":["$redirect_uri"],"token_endpoint_auth_method":"private_key_jwt","jwks":{"keys":[$rsa_public]}}]
EOF
)
password="alice upstream password"
secrets+=("$password")

started=$(date +%s%N)
env -u OIDC_ACCOUNTS PORT=0 OIDC_CLIENTS="$clients" node "$here/provider.mjs" >"$tmp/op.out" 2>"$tmp/op.err" &
op_pid=$!
for _ in $(seq 200); do
  grep -q '^listening ' "$tmp/op.out" 2>/dev/null && break
  kill -0 "$op_pid" 2>/dev/null || fail "provider exited before listening"
  sleep 0.05
done
grep -q '^listening ' "$tmp/op.out" || fail "no 'listening' line on stdout within 10 s"
line=$(head -n1 "$tmp/op.out")
[[ "$line" =~ ^listening\ (http://127\.0\.0\.1:[0-9]+)$ ]] || fail "unexpected stdout line: $line"
issuer=${BASH_REMATCH[1]}
ok "provider up at $issuer in $(( ($(date +%s%N) - started) / 1000000 )) ms"

# --- discovery and jwks ---------------------------------------------------------------------------
req discovery "$tmp/none.jar" "$issuer/.well-known/openid-configuration"
[[ $STATUS == 200 ]] || fail "discovery: HTTP $STATUS"
d="$tmp/discovery.body"
[[ $(jget "$d" 'j.issuer') == "$issuer" ]] || fail "discovery: issuer is $(jget "$d" 'j.issuer')"
authorization_endpoint=$(jget "$d" 'j.authorization_endpoint')
token_endpoint=$(jget "$d" 'j.token_endpoint')
userinfo_endpoint=$(jget "$d" 'j.userinfo_endpoint')
jwks_uri=$(jget "$d" 'j.jwks_uri')
[[ $(jget "$d" 'j.code_challenge_methods_supported.join(" ")') == S256 ]] || fail "discovery: PKCE methods"
[[ $(jget "$d" 'j.response_types_supported.join(" ")') == code ]] || fail "discovery: response types"
[[ $(jget "$d" 'j.acr_values_supported.join(" ")') == "urn:cairn:test:loa2" ]] || fail "discovery: acr values"
for m in client_secret_basic client_secret_post private_key_jwt; do
  [[ $(jget "$d" "j.token_endpoint_auth_methods_supported.includes('$m')") == true ]] || fail "discovery: no $m"
done
[[ $(jget "$d" 'j.id_token_signing_alg_values_supported.includes("RS256")') == true ]] || fail "discovery: no RS256"
ok "discovery: token_endpoint_auth_methods_supported=$(jget "$d" 'j.token_endpoint_auth_methods_supported')"
ok "discovery: id_token_signing_alg_values_supported=$(jget "$d" 'j.id_token_signing_alg_values_supported')"
req jwks "$tmp/none.jar" "$jwks_uri"
[[ $STATUS == 200 ]] || fail "jwks: HTTP $STATUS"
[[ $(jget "$tmp/jwks.body" 'j.keys.map(k => k.kty + "/" + k.alg).join(" ")') == "RSA/RS256 EC/ES256" ]] \
  || fail "jwks: $(cat "$tmp/jwks.body")"
[[ $(jget "$tmp/jwks.body" 'j.keys.some(k => "d" in k || "p" in k)') == false ]] || fail "jwks: private key material served"
ok "jwks: RSA/RS256 and EC/ES256 public keys"

# --- the authorization code flow ------------------------------------------------------------------
# authorize JAR CLIENT_ID [SCOPE [CURL_ARGS...]]: sends the authorization request; sets VERIFIER,
# STATE, NONCE; leaves STATUS/LOCATION of the response.
authorize() {
  local jar=$1 client_id=$2 scope=${3:-openid profile email} challenge
  shift 2
  if (( $# )); then shift; fi
  VERIFIER=$(rand 32)
  challenge=$(js 'process.stdout.write(require("crypto").createHash("sha256").update(process.argv[1]).digest("base64url"))' "$VERIFIER")
  STATE=$(rand 12)
  NONCE=$(rand 12)
  req authorize "$jar" -G "$authorization_endpoint" \
    --data-urlencode "client_id=$client_id" --data-urlencode "response_type=code" \
    --data-urlencode "scope=$scope" --data-urlencode "redirect_uri=$redirect_uri" \
    --data-urlencode "state=$STATE" --data-urlencode "nonce=$NONCE" \
    --data-urlencode "code_challenge=$challenge" --data-urlencode "code_challenge_method=S256" "$@"
}

# check_callback URL: asserts URL is the redirect_uri with code, the right state and iss; sets CODE.
check_callback() {
  local url=$1
  [[ "$url" == "$redirect_uri?"* ]] || fail "expected a redirect to $redirect_uri, got ${url%%\?*}"
  [[ $(query "$url" error) == "" ]] || fail "authorization error: $(query "$url" error): $(query "$url" error_description)"
  CODE=$(query "$url" code)
  [[ -n "$CODE" ]] || fail "no code in the redirect back"
  [[ $(query "$url" state) == "$STATE" ]] || fail "state mismatch in the redirect back"
  [[ $(query "$url" iss) == "$issuer" ]] || fail "iss in the redirect back is '$(query "$url" iss)'"
  secrets+=("$CODE")
}

# token CLIENT_ID: exchanges CODE (with VERIFIER) at the token endpoint, authenticating as the client
# does; sets STATUS, body in $tmp/token.body.
token() {
  local client_id=$1
  local form=(--data-urlencode grant_type=authorization_code --data-urlencode "code=$CODE"
    --data-urlencode "redirect_uri=$redirect_uri" --data-urlencode "code_verifier=$VERIFIER")
  case $client_id in
    cairn) req token "$tmp/none.jar" -u "cairn:$secret_basic" "${form[@]}" "$token_endpoint" ;;
    cairn-post) req token "$tmp/none.jar" --data-urlencode client_id=cairn-post \
      --data-urlencode "client_secret=$secret_post" "${form[@]}" "$token_endpoint" ;;
    cairn-jwt-ec | cairn-jwt-rsa)
      local key="$tmp/ec.jwk"
      [[ $client_id == cairn-jwt-rsa ]] && key="$tmp/rsa.jwk"
      req token "$tmp/none.jar" --data-urlencode "client_id=$client_id" \
        --data-urlencode client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer \
        --data-urlencode "client_assertion=$(assertion "$key" "$client_id" "$token_endpoint")" \
        "${form[@]}" "$token_endpoint" ;;
  esac
}

# check_tokens CLIENT_ID: the token response, the ID token (signature and claims) and userinfo.
check_tokens() {
  local client_id=$1 t="$tmp/token.body" access_token id_token summary
  [[ $STATUS == 200 ]] || fail "$client_id: token endpoint HTTP $STATUS: $(cat "$t")"
  [[ $(jget "$t" 'j.token_type') == Bearer ]] || fail "$client_id: token_type $(jget "$t" 'j.token_type')"
  access_token=$(jget "$t" 'j.access_token')
  id_token=$(jget "$t" 'j.id_token')
  secrets+=("$access_token" "$id_token")
  if [[ $(jget "$t" '"refresh_token" in j') == true ]]; then secrets+=("$(jget "$t" 'j.refresh_token')"); fi
  summary=$(js 'const c = require("crypto"), fs = require("fs");
    const [token, jwksFile, issuer, aud, nonce] = process.argv.slice(1);
    const fail = (m) => { console.error(m); process.exit(1); };
    const [h, p, s] = token.split(".");
    const header = JSON.parse(Buffer.from(h, "base64url"));
    const claims = JSON.parse(Buffer.from(p, "base64url"));
    if (header.alg !== "RS256") fail("alg is " + header.alg);
    const jwk = JSON.parse(fs.readFileSync(jwksFile, "utf8")).keys.find((k) => k.kid === header.kid);
    if (!jwk) fail("kid " + header.kid + " not in the jwks");
    const key = c.createPublicKey({ key: jwk, format: "jwk" });
    if (!c.verify("sha256", Buffer.from(h + "." + p), key, Buffer.from(s, "base64url"))) fail("bad signature");
    const now = Math.floor(Date.now() / 1000);
    const want = { iss: issuer, aud, nonce, sub: "upstream-alice", acr: "urn:cairn:test:loa2", amr: ["pwd"] };
    for (const [k, v] of Object.entries(want)) {
      if (JSON.stringify(claims[k]) !== JSON.stringify(v)) fail(k + " is " + JSON.stringify(claims[k]));
    }
    if (!(claims.exp > now && claims.exp <= now + 300 + 5)) fail("exp " + claims.exp + " not within 300 s");
    if (!(claims.iat <= now + 5) || typeof claims.auth_time !== "number") fail("iat/auth_time");
    process.stdout.write(Object.keys(claims).sort().join(","));' \
    "$id_token" "$tmp/jwks.body" "$issuer" "$client_id" "$NONCE" 2>&1) \
    || fail "$client_id: ID token: $summary"
  ok "$client_id: ID token RS256, signature ok, claims [$summary]"

  req userinfo "$tmp/none.jar" -H "Authorization: Bearer $access_token" "$userinfo_endpoint"
  [[ $STATUS == 200 ]] || fail "$client_id: userinfo HTTP $STATUS: $(cat "$tmp/userinfo.body")"
  local u="$tmp/userinfo.body"
  [[ $(jget "$u" '[j.sub, j.name, j.email, j.email_verified].join("|")') == "upstream-alice|Alice Upstream|alice@example.org|true" ]] \
    || fail "$client_id: userinfo is $(cat "$u")"
  ok "$client_id: userinfo $(cat "$u")"

  # A code is single use.
  token "$client_id"
  [[ $STATUS == 400 && $(jget "$tmp/token.body" 'j.error') == invalid_grant ]] \
    || fail "$client_id: replayed code gave HTTP $STATUS $(cat "$tmp/token.body")"
  ok "$client_id: replayed code -> 400 invalid_grant"
}

# login_flow CLIENT_ID [wrong]: a fresh browser (cookie jar): authorize, login page, (a wrong password
# first), the right password, the redirects back, the code exchange.
login_flow() {
  local client_id=$1 jar="$tmp/$1.jar" interaction hops
  authorize "$jar" "$client_id"
  [[ $STATUS == 303 && $LOCATION == "$issuer/interaction/"* ]] || fail "$client_id: authorize gave HTTP $STATUS -> $LOCATION"
  interaction=$LOCATION
  hops="GET /auth?... -> 303 ${LOCATION#"$issuer"}"
  req interaction "$jar" "$interaction"
  [[ $STATUS == 200 ]] || fail "$client_id: interaction page HTTP $STATUS"
  local page="$tmp/interaction.body"
  for needle in 'name="login"' 'id="login"' 'type="password"' 'name="password"' 'id="password"' 'id="sign-in"' \
    "action=\"${interaction#"$issuer"}/login\"" 'method="post"'; do
    grep -qF -- "$needle" "$page" || fail "$client_id: login page lacks $needle"
  done
  hops+=" | GET ${interaction#"$issuer"} -> 200 login form"

  if [[ ${2:-} == wrong ]]; then
    req wrong "$jar" --data-urlencode login=alice --data-urlencode "password=not the password" "$interaction/login"
    [[ $STATUS == 401 ]] || fail "wrong password gave HTTP $STATUS"
    grep -qF 'Invalid login or password' "$tmp/wrong.body" || fail "wrong password page lacks the error text"
    grep -qF 'id="sign-in"' "$tmp/wrong.body" || fail "wrong password page lacks the form"
    req wrong2 "$jar" --data-urlencode login=mallory --data-urlencode "password=$password" "$interaction/login"
    [[ $STATUS == 401 ]] || fail "unknown login gave HTTP $STATUS"
    req escaped "$jar" --data-urlencode 'login=<script>x</script>"' --data-urlencode password=x "$interaction/login"
    if [[ $STATUS != 401 ]] || ! grep -qF '&lt;script&gt;x&lt;/script&gt;&quot;' "$tmp/escaped.body" \
      || grep -qF '<script>' "$tmp/escaped.body"; then
      fail "the echoed login is not escaped"
    fi
    ok "wrong password and unknown login -> 401 'Invalid login or password', form shown again, input escaped"
  fi

  req login "$jar" --data-urlencode login=alice --data-urlencode "password=$password" "$interaction/login"
  [[ $STATUS == 303 && $LOCATION == "$issuer/auth/"* ]] || fail "$client_id: login POST gave HTTP $STATUS -> ${LOCATION%%\?*}"
  hops+=" | POST ${interaction#"$issuer"}/login -> 303 ${LOCATION#"$issuer"}"
  local resume=$LOCATION
  req resume "$jar" "$resume"
  [[ $STATUS == 303 ]] || fail "$client_id: resume gave HTTP $STATUS: $(head -c 300 "$tmp/resume.body")"
  hops+=" | GET ${resume#"$issuer"} -> 303 ${LOCATION%%\?*}?code&state&iss"
  check_callback "$LOCATION"
  ok "$client_id: redirects: $hops"
  token "$client_id"
  check_tokens "$client_id"
}

login_flow cairn wrong
login_flow cairn-post
login_flow cairn-jwt-ec
login_flow cairn-jwt-rsa

# Single sign-on: the browser that signed in for `cairn` asks for `cairn-post`: no login page, the
# consent is given automatically and the browser goes straight back.
authorize "$tmp/cairn.jar" cairn-post
[[ $STATUS == 303 && $LOCATION == "$issuer/interaction/"* ]] || fail "sso: authorize gave HTTP $STATUS -> $LOCATION"
req sso-interaction "$tmp/cairn.jar" "$LOCATION"
[[ $STATUS == 303 && $LOCATION == "$issuer/auth/"* ]] || fail "sso: interaction gave HTTP $STATUS -> ${LOCATION%%\?*}"
req sso-resume "$tmp/cairn.jar" "$LOCATION"
[[ $STATUS == 303 ]] || fail "sso: resume gave HTTP $STATUS"
check_callback "$LOCATION"
token cairn-post
[[ $STATUS == 200 ]] || fail "sso: token HTTP $STATUS: $(cat "$tmp/token.body")"
secrets+=("$(jget "$tmp/token.body" 'j.access_token')" "$(jget "$tmp/token.body" 'j.id_token')")
ok "sso: second client signed in without a login page (consent given automatically)"

# Refresh tokens: offline_access with prompt=consent (OIDC Core 11), for a client allowed the grant.
jar="$tmp/offline.jar"
authorize "$jar" cairn "openid offline_access" --data-urlencode prompt=consent
[[ $STATUS == 303 ]] || fail "offline: authorize gave HTTP $STATUS"
req offline-login "$jar" --data-urlencode login=alice --data-urlencode "password=$password" "$LOCATION/login"
[[ $STATUS == 303 ]] || fail "offline: login POST gave HTTP $STATUS"
req offline-resume "$jar" "$LOCATION"
check_callback "$LOCATION"
token cairn
[[ $STATUS == 200 ]] || fail "offline: token HTTP $STATUS: $(cat "$tmp/token.body")"
refresh_token=$(jget "$tmp/token.body" 'j.refresh_token ?? ""')
[[ -n "$refresh_token" ]] || fail "offline: no refresh_token for scope offline_access"
secrets+=("$refresh_token" "$(jget "$tmp/token.body" 'j.access_token')" "$(jget "$tmp/token.body" 'j.id_token')")
req refresh "$tmp/none.jar" -u "cairn:$secret_basic" --data-urlencode grant_type=refresh_token \
  --data-urlencode "refresh_token=$refresh_token" "$token_endpoint"
[[ $STATUS == 200 && $(jget "$tmp/refresh.body" 'typeof j.id_token') == string ]] \
  || fail "offline: refresh gave HTTP $STATUS $(cat "$tmp/refresh.body")"
secrets+=("$(jget "$tmp/refresh.body" 'j.access_token')" "$(jget "$tmp/refresh.body" 'j.id_token')" \
  "$(jget "$tmp/refresh.body" 'j.refresh_token ?? ""')")
ok "offline_access + prompt=consent -> refresh_token; refresh grant -> new tokens"

# PKCE is required.
req nopkce "$tmp/nopkce.jar" -G "$authorization_endpoint" --data-urlencode client_id=cairn \
  --data-urlencode response_type=code --data-urlencode scope=openid \
  --data-urlencode "redirect_uri=$redirect_uri" --data-urlencode state=s1
[[ $STATUS == 303 && $(query "$LOCATION" error) == invalid_request ]] \
  || fail "no code_challenge gave HTTP $STATUS -> $LOCATION"
ok "no code_challenge -> redirect back with error=invalid_request ($(query "$LOCATION" error_description))"

# A wrong client secret.
req badsecret "$tmp/none.jar" -u "cairn:wrong" --data-urlencode grant_type=authorization_code \
  --data-urlencode code=x --data-urlencode "redirect_uri=$redirect_uri" --data-urlencode code_verifier=x \
  "$token_endpoint"
[[ $STATUS == 401 && $(jget "$tmp/badsecret.body" 'j.error') == invalid_client ]] \
  || fail "wrong client secret gave HTTP $STATUS $(cat "$tmp/badsecret.body")"
ok "wrong client secret -> 401 invalid_client"

# --- shutdown, stdout contract, no secrets in the log -------------------------------------------------
kill -TERM "$op_pid"
rc=0
wait "$op_pid" || rc=$?
op_pid=""
[[ $rc == 0 ]] || fail "provider exited with $rc on SIGTERM"
ok "SIGTERM -> exit 0"
[[ $(wc -l <"$tmp/op.out") == 1 ]] || fail "stdout has more than the listening line: $(cat "$tmp/op.out")"
ok "stdout: exactly '$line'"
for s in "${secrets[@]}"; do
  [[ -n "$s" ]] || continue
  if grep -qF -- "$s" "$tmp/op.err"; then fail "the provider's log contains a secret, code or token"; fi
done
ok "log ($(wc -l <"$tmp/op.err") lines on stderr) holds none of the ${#secrets[@]} passwords, secrets, codes and tokens"
echo "selftest passed"
